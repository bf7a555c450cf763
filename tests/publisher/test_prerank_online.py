"""The pre-ranker's user rows online: streamed ranking samples -> the online
trainer (beside the retrieval rows) -> an embeddings release carrying them
(files, checksums, manifest) -> the service's /v1/prerank and /v1/recommend
after the hot swap, and the freshness figure saying so."""

from __future__ import annotations

import json

import numpy as np
import pytest
from freshtower.publisher.prerank_rows import PRERANK_USER_IDS, PRERANK_USER_ROWS
from freshtower.publisher.statistics_feed import STATISTICS_FILE, load_statistics, statistics_snapshots
from freshtower.publisher.publish import Publisher
from freshtower.publisher.releases import ReleaseError, ReleaseStore
from freshtower.publisher.service import create_app
from freshtower.trainer.online import OnlineTrainer
from freshtower.trainer.prerank_full import load_preranker
from starlette.testclient import TestClient

from freshtower.core.contracts.online_checkpoint import read_online_checkpoint
from tests.publisher.test_prerank_service import FEATURES, release_prerank_world
from tests.publisher.test_service import wait_until_serving
from tests.streams.oracle import stream_batches

pytestmark = pytest.mark.slow  # two simulated days through the streams join, two trainings, an online run
BATCHES = 6  # online batches of the second day: some users get new ranking samples, most do not


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return release_prerank_world(tmp_path_factory.mktemp("prerank-online") / "data")


def scores(http, user_id: str, candidates: list[str]) -> tuple[dict[str, float], dict]:
    response = http.post("/v1/prerank", json={"user_id": user_id, "user_features": FEATURES, "candidates": candidates})
    assert response.status_code == 200, response.text
    body = response.json()
    return {item["item_id"]: item["score"] for item in body["items"]}, body


def test_an_embeddings_release_carries_the_learnt_preranker_rows_and_the_service_serves_them(world):
    settings, sim, preranker, full = world
    store = ReleaseStore(settings.releases_dir)
    candidates = [sim.item_id(i) for i in range(60)]
    with TestClient(create_app(settings)) as http:
        wait_until_serving(http, full)
        daily_users = [u for u in load_preranker(preranker.ref).model.user_ids.row_ids() if u]
        before = {user: scores(http, user, candidates) for user in daily_users}

        trainer = OnlineTrainer.start(settings)
        trainer.run(max_batches=BATCHES, prefetch=False)
        saved = read_online_checkpoint(trainer.checkpoint()).prerank
        assert saved is not None and saved.base_version == preranker.ref.version and saved.step > 0
        with Publisher(settings) as publisher:
            outcome = publisher.publish_delta_if_due(now_s=1e6, force=True)
        assert outcome.status == "published", outcome
        release = store.verify(outcome.version)  # every file against its SHA-256
        assert {PRERANK_USER_IDS, PRERANK_USER_ROWS, "prerank_row_event_time_ms.npy"} <= set(release.manifest.files)
        learnt = json.loads(release.file(PRERANK_USER_IDS).read_text())
        summary = release.manifest.prerank
        assert summary.model_version == preranker.ref.version and summary.count == len(learnt) > 0
        # ranking samples land in the batch of the window they were joined in: late ones of the day
        # before the daily model's data end are new to it too
        assert preranker.ref.manifest.data_start_ms < summary.newest_event_time_ms
        wait_until_serving(http, outcome.version)  # the hot swap

        changed = [u for u in learnt if u in before]
        unchanged = [u for u in daily_users if u not in set(learnt)]
        assert changed and unchanged, (len(changed), len(unchanged))
        for user in changed:
            after, body = scores(http, user, candidates)
            assert after != before[user][0], user
            assert body["freshness"]["prerank_rows_release"] == outcome.version
            assert preranker.ref.manifest.data_start_ms < body["freshness"]["prerank_user_event_time_ms"] <= summary.newest_event_time_ms
            assert before[user][1]["freshness"]["prerank_user_event_time_ms"] is None
        for user in unchanged:
            after, body = scores(http, user, candidates)
            assert after == before[user][0], user
            assert body["freshness"]["prerank_user_event_time_ms"] is None
        # /v1/recommend pre-ranks with the same new rows
        user = changed[0]
        recommended = http.post("/v1/recommend", json={"user_id": user, "user_features": FEATURES, "recall_k": 40, "keep": 10}).json()
        recalled = [item["item_id"] for item in recommended["items"]]
        now, _ = scores(http, user, recalled)
        assert all(np.isclose(item["score"], now[item["item_id"]]) for item in recommended["items"])
        assert recommended["freshness"]["prerank_rows_release"] == outcome.version


def test_a_corrupt_preranker_row_file_fails_its_checksum(world, tmp_path):
    settings, _, _, _ = world
    store = ReleaseStore(settings.releases_dir)
    version = store.active_version()
    release = store.get(version)
    if release.manifest.kind != "embeddings" or release.manifest.prerank is None:
        pytest.skip("needs the embeddings release of the test above")
    path = release.file(PRERANK_USER_ROWS)
    original = path.read_bytes()
    try:
        data = bytearray(original)
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(ReleaseError, match=PRERANK_USER_ROWS):
            store.verify(version)
    finally:
        path.write_bytes(original)


def test_each_embeddings_release_carries_fresh_statistics_and_the_service_scores_with_them(world):
    settings, sim, preranker, full = world
    store = ReleaseStore(settings.releases_dir)
    full_statistics = load_statistics(store.get(full).file(STATISTICS_FILE))
    candidates = [sim.item_id(i) for i in range(60)]
    user = sim.user_id(3)
    with TestClient(create_app(settings)) as http:
        wait_until_serving(http, store.active_version())
        before, body = scores(http, user, candidates)
        served_before = body["freshness"]["statistics_as_of_ms"]
        stream_batches(sim, [2], settings.batches_dir)  # a day later: every count moves
        trainer = OnlineTrainer.start(settings)
        trainer.run(max_batches=40, prefetch=False)  # some rows changed, so a release is due
        with Publisher(settings) as publisher:
            outcome = publisher.publish_delta_if_due(now_s=2e6, force=True)
        assert outcome.status == "published", outcome
        release = store.verify(outcome.version)
        assert STATISTICS_FILE in release.manifest.files
        carried = load_statistics(release.file(STATISTICS_FILE))
        assert release.manifest.statistics_as_of_ms == carried.as_of_ms > full_statistics.as_of_ms >= served_before
        assert carried.as_of_ms >= sim.day_start_ms(2) + 23 * 3_600_000  # as of day 2's end, not the full release's
        assert release.manifest.rows["statistics_keys"] == carried.keys
        # complete on its own: what a fresh read of the batches gives
        fresh = statistics_snapshots(settings.batches_dir)
        np.testing.assert_array_equal(fresh.items.counts, carried.items.counts)
        np.testing.assert_array_equal(fresh.by_category.keys, carried.by_category.keys)
        wait_until_serving(http, outcome.version)
        after, body = scores(http, user, candidates)
        assert body["freshness"]["statistics_as_of_ms"] == carried.as_of_ms
        assert after != before  # the cross tower reads the new counts
    # a service started now loads the chain and serves the newest snapshot
    with TestClient(create_app(settings)) as http:
        wait_until_serving(http, outcome.version)
        again, body = scores(http, user, candidates)
        assert body["freshness"]["statistics_as_of_ms"] == carried.as_of_ms
        assert again == after
