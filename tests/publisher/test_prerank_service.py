"""The pre-ranker through the release and the service: streamed ranking
samples -> daily pre-ranker -> full release (its files, checksums, gate,
statistics) -> POST /v1/prerank and /v1/recommend, /metrics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from freshtower.publisher.prerank_release import choose_preranker
from freshtower.publisher.statistics_feed import load_statistics
from freshtower.publisher.publish import Publisher
from freshtower.publisher.releases import ReleaseStore
from freshtower.publisher.service import create_app
from freshtower.trainer.full import train_full
from freshtower.trainer.prerank_full import train_prerank_full
from freshtower.trainer.prerank_model import ThreeTowerPreranker
from starlette.testclient import TestClient

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.batches import list_batches
from freshtower.core.batches.ranking import read_statistics_rows
from freshtower.core.statistics import ItemStatistics, item_count_deltas
from tests.publisher.conftest import publisher_settings
from tests.streams.oracle import stream_batches

pytestmark = pytest.mark.slow  # two simulated days through the streams join, two trainings
DAY0 = "2026-11-20"
SMALL = {"id_dim": 8, "categorical_dim": 4, "user_hidden_dims": [16], "item_hidden_dims": [16], "tower_dim": 8,
         "cross_hidden_dims": [8], "cross_dim": 4, "upper_hidden_dims": [16, 8], "eval_top_k": 5, "eval_keep": 10,
         "max_candidates": 500}
FEATURES = {"age_bucket": "25-34", "city": "city3", "device": "ios", "activity_7d": 0.4, "hour_sin": 0.5, "hour_cos": 0.8}


def settings_for(data_dir, **prerank):
    return publisher_settings(data_dir, prerank={**SMALL, **prerank}, vocabulary={"user_min_count": 1},
                              model={"id_dim": 16, "output_dim": 16, "hidden_dims": [32]})


def release_prerank_world(data_dir):
    """Two simulated days through the streams join, day 0's retrieval model
    and pre-ranker trained and published: (settings, simulator, pre-ranker,
    full release version)."""
    sim = Simulator(SimulatorConfig(users=150, items=120, topics=8, requests_per_day=1000, seed=7))
    stream_batches(sim, [0, 1], data_dir / "batches")
    settings = settings_for(data_dir)
    preranker = train_prerank_full(settings, DAY0)
    train_full(settings, DAY0)
    with Publisher(settings) as publisher:
        outcome = publisher.publish_full_if_new(now_s=0.0)
    assert outcome.status == "published", outcome
    return settings, sim, preranker, outcome.version


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return release_prerank_world(tmp_path_factory.mktemp("prerank-release") / "data")


def test_a_full_release_carries_the_preranker_its_files_and_the_statistics(released):
    settings, sim, preranker, version = released
    release = ReleaseStore(settings.releases_dir).verify(version)  # every file against its SHA-256
    for name in ("prerank.pt", "prerank_item_ids.json", "prerank_item_rows.npy", "prerank_item_codes.npy", "statistics.npz", "prerank.json"):
        assert name in release.manifest.files
    note = json.loads(release.file("prerank.json").read_text())
    assert note["model_version"] == preranker.ref.version and note["items"] > 50
    statistics = load_statistics(release.file("statistics.npz"))
    # the published item counts equal every partition's rows summed as of that minute
    items = ItemStatistics()
    for ref in list_batches(settings.batches_dir):
        rows = read_statistics_rows(ref)
        if rows is not None:
            items.apply(item_count_deltas(rows))
    expected = items.snapshot(statistics.as_of_ms)
    np.testing.assert_array_equal(statistics.items.keys, expected.keys)
    np.testing.assert_array_equal(statistics.items.counts, expected.counts)
    assert statistics.items.counts.sum() > 0


def test_the_gate_refuses_a_preranker_worse_than_its_parent(released, tmp_path):
    settings, *_ = released
    copy = tmp_path / "data"
    shutil.copytree(settings.data_dir, copy)
    strict = settings_for(copy, max_quality_drop=0.0)
    second = train_prerank_full(strict, "2026-11-21")  # no holdout after day 1: nothing to compare, so it passes
    chosen, refusals = choose_preranker(strict)
    assert chosen.version == second.ref.version and refusals == []
    manifest_path = second.ref.path / "manifest.json"
    record = json.loads(manifest_path.read_text())  # make its holdout worse than its parent's
    record["metrics"].update({"ndcg@10": 0.1, "parent": {"version": "x", "ndcg@10": 0.9}})
    manifest_path.write_text(json.dumps(record))
    chosen, refusals = choose_preranker(strict)
    assert chosen.version != second.ref.version and len(refusals) == 1 and "ndcg@10" in refusals[0]


def test_prerank_and_recommend_score_sort_and_report(released):
    settings, sim, preranker, version = released
    with TestClient(create_app(settings)) as http:
        candidates = [sim.item_id(i) for i in range(60)] + ["never-seen-item"]
        response = http.post("/v1/prerank", json={"user_id": sim.user_id(3), "user_features": FEATURES, "candidates": candidates, "keep": 20})
        assert response.status_code == 200, response.text
        body = response.json()
        scores = [item["score"] for item in body["items"]]
        assert len(scores) == 20 and scores == sorted(scores, reverse=True)
        assert body["unknown_ids"] == ["never-seen-item"] and body["candidates"] == 61
        assert body["releases"]["full"] == version and body["releases"]["prerank_model_version"] == preranker.ref.version
        assert body["freshness"]["statistics_as_of_ms"] > 0 and body["item_cache"]["hits"] == 60
        # the service's scores are the model's: the same candidates through forward() order the same way
        everything = http.post("/v1/prerank", json={"user_id": sim.user_id(3), "user_features": FEATURES, "candidates": candidates}).json()
        assert [i["item_id"] for i in everything["items"]][:20] == [i["item_id"] for i in body["items"]]

        recommended = http.post("/v1/recommend", json={"user_id": sim.user_id(3), "user_features": FEATURES, "recall_k": 50, "keep": 10})
        assert recommended.status_code == 200, recommended.text
        r = recommended.json()
        assert len(r["items"]) == 10 and r["candidates"] == 50 and all(i["recall_score"] is not None for i in r["items"])

        metrics = http.get("/metrics").text
        assert "freshtower_prerank_item_cache_hit_rate" in metrics
        assert 'freshtower_prerank_stage_seconds_count{stage="item_tower"}' in metrics
        assert 'freshtower_prerank_stage_seconds_count{stage="upper_layers"} 3.0' in metrics
        assert 'freshtower_prerank_requests_total{endpoint="recommend",outcome="ok"} 1.0' in metrics


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"user_id": "u1", "candidates": []}, "invalid_candidates"),
        ({"user_id": "u1", "candidates": ["i1"] * 501}, "too_many_candidates"),
        ({"user_id": "u1", "candidates": ["i1", "bad\u0001id"]}, "invalid_candidates"),
        ({"user_id": "u1", "candidates": ["i1"], "keep": 0}, "invalid_keep"),
        ({"user_id": "u1", "candidates": ["i1"], "user_features": {"shoe_size": 3}}, "feature_mismatch"),
        ({"user_id": "u1", "candidates": ["i1"], "user_features": {"city": 3}}, "feature_mismatch"),
        ({"user_id": "u1"}, "missing_field"),
        ({"user_id": "u1", "candidates": ["i1"], "extra": 1}, "unknown_field"),
    ],
)
def test_bad_prerank_input_gets_a_4xx_with_a_reason(released, body, reason):
    settings, *_ = released
    with TestClient(create_app(settings)) as http:
        response = http.post("/v1/prerank", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["reason"] == reason, response.json()


def test_bad_recommend_input_gets_a_4xx_with_a_reason(released):
    settings, *_ = released
    with TestClient(create_app(settings)) as http:
        for body, reason in (
            ({"user_id": "u1", "recall_k": 10_001}, "recall_k_above_max"),
            ({"user_id": "u1", "recall_k": 10, "keep": 11}, "keep_above_max"),
            ({"user_id": "u1", "recall_k": 0}, "invalid_recall_k"),
        ):
            response = http.post("/v1/recommend", json=body)
            assert response.status_code == 422 and response.json()["reason"] == reason, (body, response.text)
        huge = http.post("/v1/prerank", content=b'{"user_id": "u", "candidates": [' + b'"i1",' * 500_000 + b'"i1"]}',
                         headers={"content-type": "application/json"})
        assert huge.status_code == 413 and "max_prerank_request_bytes" in huge.json()["detail"]


def test_a_release_without_a_preranker_answers_503(tmp_path, released):
    settings, *_ = released
    copy = tmp_path / "data"
    shutil.copytree(settings.data_dir / "batches", copy / "batches")
    plain = settings_for(copy)
    train_full(plain, DAY0)  # no pre-ranker trained
    with Publisher(plain) as publisher:
        assert publisher.publish_full_if_new(now_s=0.0).status == "published"
    with TestClient(create_app(plain)) as http:
        response = http.post("/v1/prerank", json={"user_id": "u1", "candidates": ["i1"]})
        assert response.status_code == 503 and "no pre-ranker" in response.json()["detail"]
        assert http.post("/v1/recall", json={"user_id": "u1", "k": 5}).status_code == 200


assert ThreeTowerPreranker  # the model the release's prerank.pt holds


def test_the_run_summary_shows_the_preranker_and_one_recommend_answer(released):
    from freshtower.publisher.service import ServiceThread

    from freshtower.app.observation import prerank_lines
    from freshtower.app.run_state import RunSummary, render_summary

    settings, sim, preranker, version = released
    with ServiceThread(create_app(settings)) as service:
        lines = prerank_lines(settings, service.url, sim.user_id(3), FEATURES, recall_k=50, keep=10)
    assert lines[0].startswith(f"prerank    {preranker.ref.version} in release {version}")
    assert lines[1].startswith(f"recommend  user {sim.user_id(3)}: 50 recalled -> 10 pre-ranked")
    summary = RunSummary("sim", 1.0, 1.0, 0.0, {}, 0, {}, 0, {}, 0, 0, 60.0, [], {}, 1, 0, None, 0, None, prerank=lines)
    assert all(f"  {line}" in render_summary(summary) for line in lines)
