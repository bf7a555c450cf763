"""Items born after the full release: embedded by the frozen item tower,
carried by embeddings releases, served beside the full index.

The world: the day-0 full model on the simulated data, plus a batch early
on day 1 with clicks on two items no model has seen (``born-1`` in a known
category, ``born-2`` in a category never seen).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import torch
from freshtower.publisher.new_item_index import NewItemIndex
from freshtower.publisher.publish import Publisher
from freshtower.publisher.releases import ReleaseError, ReleaseStore
from freshtower.publisher.serving import load_state, search, served_item_ids
from freshtower.trainer.artifacts import full_models_dir, latest_full_model, load_full_model
from freshtower.trainer.online import OnlineTrainer

from freshtower.core.batches import Sample, write_batch
from freshtower.core.eventtime import MINUTE_MS
from tests.publisher.conftest import publisher_settings
from tests.publisher.test_service import in_process, wait_until_serving

BORN = {"born-1": "c3", "born-2": "c-unseen"}  # item -> category


def add_births(data_dir, simulator) -> list[str]:
    """A one-minute batch at 00:05 on day 1 with clicks on the BORN items
    by the day's first users; returns those users."""
    start = simulator.day_start_ms(1) + 5 * MINUTE_MS
    users = [simulator.user_id(u) for u in range(12)]
    samples = []
    for n, user in enumerate(users):
        item = list(BORN)[n % 2]
        features = simulator.user_features(n, start)
        samples.append(
            Sample(
                user_id=user,
                item_id=item,
                label=1,
                event_time_ms=start + 1000 * n,
                request_id=f"born-r{n}",
                position=0,
                user_categorical=features["categorical"],
                user_numeric=features["numeric"],
                item_categorical={"category": BORN[item]},
            )
        )
    write_batch(data_dir / "batches", start, start + MINUTE_MS, samples)
    return users


def online_through_births(settings) -> OnlineTrainer:
    trainer = OnlineTrainer.start(settings)
    trainer.run(max_batches=3, prefetch=False)  # 00:00, 00:05 (the births), 00:10
    assert set(BORN) <= set(trainer.model.catalogue.ids)
    return trainer


def user_requests(simulator, users: list[str], at_ms: int) -> list[dict]:
    requests = []
    for n, user in enumerate(users):
        features = simulator.user_features(n, at_ms)
        requests.append({"user_id": user, "user_features": {**features["categorical"], **features["numeric"]}})
    return requests


def best_placed(state, requests: list[dict], item_id: str) -> tuple[dict, int]:
    """The request whose user ranks ``item_id`` highest in ``state``, and that rank (0-based)."""
    names = served_item_ids(state)
    best = None
    for request in requests:
        features = request["user_features"]
        vector = state.tower.vector(state.id_table[state.user_rows.get(request["user_id"], 0)], features)
        ranked = [names[r] for r in search(state, vector[None], len(names))[0].tolist()]
        rank = ranked.index(item_id)
        if best is None or rank < best[1]:
            best = (request, rank)
    return best


@pytest.fixture
def born(data_dir, small_simulator):
    add_births(data_dir, small_simulator)
    everyone = [small_simulator.user_id(u) for u in range(small_simulator.config.users)]
    requests = user_requests(small_simulator, everyone, small_simulator.day_start_ms(1) + 20 * MINUTE_MS)
    return data_dir, requests


def test_an_item_born_after_the_full_release_is_retrieved_after_an_embeddings_release_and_not_before(born):
    data_dir, requests = born
    settings = publisher_settings(data_dir)
    online_through_births(settings)
    store = ReleaseStore(settings.releases_dir)
    with Publisher(settings) as publisher, in_process(settings) as http:
        full = publisher.publish_full_if_new(now_s=0.0)
        wait_until_serving(http, full.version)
        catalogue = store.get(full.version).manifest.rows["items"]
        before = {r["user_id"]: http.post("/v1/recall", json={**r, "k": catalogue}).json() for r in requests[:20]}
        delta = publisher.publish_delta_if_due(now_s=1.0)
        assert delta.status == "published", delta.reason
        wait_until_serving(http, delta.version)
        state = load_state(store, delta.version)
        request, rank = best_placed(state, requests, "born-1")
        assert rank < catalogue  # the user whose vector points at it most; k = rank + 1 below
        after = http.post("/v1/recall", json={**request, "k": rank + 1}).json()
        everything = http.post("/v1/recall", json={**request, "k": catalogue + len(BORN)}).json()
        metrics = http.get("/metrics").text

    # Before: the full release alone, asked for every item it has, returns neither.
    for answer in before.values():
        assert len(answer["items"]) == catalogue and not {i["item_id"] for i in answer["items"]} & set(BORN)
    # After: it is in this user's top-k, in its place.
    assert [i["item_id"] for i in after["items"]][-1] == "born-1"
    assert after["releases"]["active"] == delta.version
    # Every ID maps to its own vector: the scores are the cosines of the release's vectors, in order.
    release, root = store.get(delta.version), store.get(full.version)
    vectors = dict(zip(json.loads(root.file("item_ids.json").read_text()), np.load(root.file("item_vectors.npy"))))
    vectors.update(zip(json.loads(release.file("new_item_ids.json").read_text()), np.load(release.file("new_item_vectors.npy"))))
    features = request["user_features"]
    user = state.tower.vector(state.id_table[state.user_rows.get(request["user_id"], 0)], features)
    exact = sorted(vectors, key=lambda i: -float(vectors[i] @ user))
    assert [i["item_id"] for i in everything["items"]] == exact and set(BORN) <= set(exact)
    np.testing.assert_allclose([i["score"] for i in everything["items"]], [float(vectors[i] @ user) for i in exact], atol=1e-5)
    assert "freshtower_new_items_served 2.0" in metrics
    assert "freshtower_recall_new_items_total 3.0" in metrics  # born-1 once, then both


def test_the_manifest_lists_the_new_item_files_with_their_checksums_and_the_frozen_towers_vectors(born):
    data_dir, _ = born
    settings = publisher_settings(data_dir, publisher={"new_item_clicks": False})  # the frozen tower's vectors alone
    online_through_births(settings)
    with Publisher(settings) as publisher:
        _, delta = publisher.tick(now_s=0.0)
    release = ReleaseStore(settings.releases_dir).get(delta.version)
    manifest = release.manifest
    model_ref = latest_full_model(full_models_dir(settings))
    assert manifest.format == 2 and manifest.new_items.count == 2 and manifest.rows["new_items"] == 2
    assert manifest.new_items.seen_since_ms == model_ref.data_end_ms
    for name in ("new_item_ids.json", "new_item_vectors.npy"):
        data = release.file(name).read_bytes()
        assert manifest.files[name].sha256 == hashlib.sha256(data).hexdigest() and manifest.files[name].bytes == len(data)
    ids = json.loads(release.file("new_item_ids.json").read_text())
    assert sorted(ids) == sorted(BORN)
    model = load_full_model(model_ref).model
    assert "born-1" not in model.item_ids and "c-unseen" not in model.item_values["category"]
    # publisher.new_item_id_row = feature_mean: the mean ID row of the catalogue's items of its category;
    # born-2's category was never seen: the mean of every item's row, and the category table's default row
    table = model.item_tower.id_embedding.detach()
    in_c3 = [i for i, f in zip(model.catalogue.ids, model.catalogue.features_of(range(len(model.catalogue)))) if f == ("c3",)]
    assert in_c3
    mean_rows = {"c3": table[model.item_ids.lookup(in_c3)].mean(0), "c-unseen": table[model.item_ids.lookup(model.catalogue.ids)].mean(0)}
    inputs = model.item_inputs(ids, {"category": [BORN[i] for i in ids]})
    with torch.no_grad():
        expected = model.item_tower.from_id_vectors(torch.stack([mean_rows[BORN[i]] for i in ids]), inputs).numpy()
        default_row = model.item_vectors(inputs).numpy()
    np.testing.assert_allclose(np.load(release.file("new_item_vectors.npy")), expected, atol=1e-5)
    assert not np.allclose(expected, default_row, atol=1e-3)

    # new_item_id_row = default: the ID table's default row, as the model's own item_vectors reads an unknown ID
    default_settings = publisher_settings(data_dir, publisher={"new_item_id_row": "default", "new_item_clicks": False})
    with Publisher(default_settings) as publisher:
        train_more = OnlineTrainer.start(default_settings)
        train_more.run(max_batches=1, prefetch=False)
        again = publisher.publish_delta_if_due(now_s=1e6)
    assert again.status == "published", again.reason
    release = ReleaseStore(settings.releases_dir).get(again.version)
    ids = json.loads(release.file("new_item_ids.json").read_text())
    with torch.no_grad():
        default_row = model.item_vectors(model.item_inputs(ids, {"category": [BORN[i] for i in ids]})).numpy()
    np.testing.assert_allclose(np.load(release.file("new_item_vectors.npy")), default_row, atol=1e-6)


def test_each_release_carries_every_item_born_so_far_and_a_swap_leaves_the_served_state_alone(born):
    data_dir, _ = born
    settings = publisher_settings(data_dir)
    trainer = online_through_births(settings)
    store = ReleaseStore(settings.releases_dir)
    with Publisher(settings) as publisher:
        _, first = publisher.tick(now_s=0.0)
        trainer.run(max_batches=2, prefetch=False)  # no new births
        second = publisher.publish_delta_if_due(now_s=1e6)
    assert second.status == "published"
    assert store.get(second.version).manifest.new_items.count == 2
    old = load_state(store, first.version)
    old_ids, old_total = old.new_items.item_ids, len(old.index)
    new = load_state(store, second.version, current=old)  # the service's swap path: a copy
    assert new.index is old.index and len(old.index) == old_total  # the full index is shared, never written
    assert old.new_items.item_ids == old_ids and new.new_items is not old.new_items
    assert sorted(new.new_items.item_ids) == sorted(BORN)
    # from scratch (a restart) the chain gives the same state
    assert load_state(store, second.version).new_items.item_ids == new.new_items.item_ids


def test_an_item_born_today_ranks_in_its_morning_clickers_top_10_by_the_next_release(born, small_simulator):
    """Users 0, 2, ..., 10 clicked born-1 at 00:05 (add_births): the release after carries its vector moved toward
    them (publisher.new_item_clicks), so each of them finds it in their top 10 of the 500-item catalogue; the
    frozen tower's feature vector alone (the same for every new item of its category) places it far lower."""
    data_dir, _ = born
    clickers = [small_simulator.user_id(u) for u in range(0, 12, 2)]
    at = small_simulator.day_start_ms(1) + 20 * MINUTE_MS
    requests = user_requests(small_simulator, [small_simulator.user_id(u) for u in range(12)], at)
    ranks = {}
    dirs = {True: data_dir, False: data_dir.parent / "feature-vectors-only"}
    shutil.copytree(data_dir, dirs[False])  # the same world, trained and published apart
    for clicks, root in dirs.items():
        settings = publisher_settings(root, publisher={"new_item_clicks": clicks})
        online_through_births(settings)
        store = ReleaseStore(settings.releases_dir)
        with Publisher(settings) as publisher:
            _, delta = publisher.tick(now_s=0.0)
        assert delta.status == "published", delta.reason
        state = load_state(store, delta.version)
        names = served_item_ids(state)
        for request in requests:
            if request["user_id"] in clickers:
                row = state.id_table[state.user_rows.get(request["user_id"], 0)]
                ranked = [names[r] for r in search(state, state.tower.vector(row, request["user_features"])[None], len(names))[0].tolist()]
                ranks.setdefault(clicks, []).append(ranked.index("born-1"))
    assert max(ranks[True]) < 10, ranks
    assert min(ranks[False]) >= 10, ranks


def test_with_the_setting_off_no_new_items_are_released_or_served(born):
    data_dir, requests = born
    settings = publisher_settings(data_dir, publisher={"new_item_vectors": False})
    online_through_births(settings)
    with Publisher(settings) as publisher:
        _, delta = publisher.tick(now_s=0.0)
    store = ReleaseStore(settings.releases_dir)
    release = store.get(delta.version)
    assert release.manifest.new_items is None and "new_item_vectors.npy" not in release.manifest.files
    state = load_state(store, delta.version)
    assert len(state.new_items) == 0 and not set(BORN) & set(served_item_ids(state))


def test_a_release_whose_new_item_file_is_corrupt_is_refused_and_the_current_one_stays(born):
    data_dir, _ = born
    settings = publisher_settings(data_dir)
    online_through_births(settings)
    store = ReleaseStore(settings.releases_dir)
    with Publisher(settings) as publisher:
        full = publisher.publish_full_if_new(now_s=0.0)
        delta = publisher.publish_delta_if_due(now_s=1.0, activate=False)  # sealed, not active
    path = store.get(delta.version).file("new_item_vectors.npy")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one byte of born-2's vector
    path.write_bytes(bytes(data))
    with in_process(settings) as http:
        wait_until_serving(http, full.version)
        store.activate(delta.version, by="test")
        deadline = time.monotonic() + 10
        while http.get("/healthz").json()["status"] != "degraded" and time.monotonic() < deadline:
            time.sleep(0.02)
        health = http.get("/healthz").json()
        assert health["serving"] == full.version and health["active"] == delta.version
        assert "new_item_vectors.npy SHA-256" in health["refused"]
        assert "freshtower_new_items_served 0.0" in http.get("/metrics").text


def test_new_items_that_do_not_fit_are_refused_naming_the_release_and_file(born):
    data_dir, _ = born
    settings = publisher_settings(data_dir)
    online_through_births(settings)
    with Publisher(settings) as publisher:
        _, delta = publisher.tick(now_s=0.0)
    store = ReleaseStore(settings.releases_dir)
    release = store.get(delta.version)
    state = load_state(store, delta.version)
    fits = dict(full_items=state.item_set, output_dim=state.tower.output_dim, settings=state.index_settings)
    assert len(NewItemIndex.of_release(release, **fits)) == 2
    with pytest.raises(ReleaseError, match=rf"release {delta.version}: new items \['born-1'\] are in the full release's index already"):
        NewItemIndex.of_release(release, **{**fits, "full_items": state.item_set | {"born-1"}})
    counted = dataclasses.replace(release, manifest=dataclasses.replace(release.manifest, new_items=dataclasses.replace(
        release.manifest.new_items, count=3)))
    with pytest.raises(ReleaseError, match=rf"release {delta.version}: new_item_vectors.npy holds \(2, \d+\), expected 3 new items"):
        NewItemIndex.of_release(counted, **fits)
    vectors = np.load(release.file("new_item_vectors.npy"))
    np.save(release.file("new_item_vectors.npy"), vectors * 2)
    with pytest.raises(ReleaseError, match="not of unit length"):
        NewItemIndex.of_release(release, **fits)
