from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from freshtower.publisher.publish import Publisher
from freshtower.publisher.releases import ReleaseError, ReleaseStore
from freshtower.publisher.serving import load_state, recall
from freshtower.publisher.user_tower import FeatureError, ServingUserTower, export_user_tower
from freshtower.trainer.artifacts import full_models_dir, latest_full_model, load_full_model
from freshtower.trainer.online import OnlineTrainer
from freshtower.trainer.retrieval import ExactRetriever

from freshtower.core.batches import read_batch
from tests.publisher.conftest import publisher_settings


@pytest.fixture(scope="module")
def published(tmp_path_factory, day0_model_dir):
    """Day-0 full model, 4 online batches, a full release and one delta."""
    data_dir = tmp_path_factory.mktemp("serving") / "data"
    shutil.copytree(day0_model_dir, data_dir)
    settings = publisher_settings(data_dir)
    assert settings.model.user_numeric == NUMERIC
    trainer = OnlineTrainer.start(settings)
    trainer.run(max_batches=4, prefetch=False)
    with Publisher(settings) as publisher:
        full, delta = publisher.tick(now_s=0.0)
    assert delta.status == "published"
    store = ReleaseStore(settings.releases_dir)
    samples = read_batch(trainer.pending()[0], trainer.spec)  # users and features the trainer has not seen yet
    return settings, trainer, store, full.version, delta.version, samples


NUMERIC = ("activity_7d", "hour_sin", "hour_cos")  # the default model.user_numeric, in order


def features_of(samples, i: int) -> dict:
    features = {name: column[i] for name, column in samples.user_categorical.items()}
    features.update({name: float(samples.user_numeric[i, j]) for j, name in enumerate(NUMERIC)})
    return features


def test_the_serving_user_tower_computes_the_trainers_user_vectors(published):
    settings, *_, samples = published
    model = load_full_model(latest_full_model(full_models_dir(settings))).model
    tower = ServingUserTower(export_user_tower(model))
    picks = list(range(0, len(samples), max(1, len(samples) // 25)))
    users = [samples.user_ids[i] for i in picks]
    categorical = {name: [column[i] for i in picks] for name, column in samples.user_categorical.items()}
    numeric = samples.user_numeric[picks]
    expected = model.user_vectors(model.user_inputs(users, categorical, numeric)).detach().numpy()
    rows = model.user_ids.lookup(users)
    actual = tower.vectors(model.user_tower.id_embedding.detach().numpy()[rows], categorical, numeric)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def test_the_one_request_and_batch_paths_equal_the_trainers_tower_from_id_vectors(published):
    # The oracle: the trainer's own Tower.from_id_vectors (torch) on the full
    # model behind the release, fed the ID rows that serving holds (online
    # rows of the delta, row 0 for strangers) and the same features.
    settings, _, store, _, delta, samples = published
    state = load_state(store, delta)
    model = load_full_model(latest_full_model(full_models_dir(settings))).model
    picks = list(range(0, len(samples), max(1, len(samples) // 40)))
    users = [samples.user_ids[i] for i in picks[:-2]] + ["a-stranger", "another-stranger"]
    features = [features_of(samples, i) for i in picks]
    features[-1] = {"city": "a-city-never-seen", "activity_7d": -2.5}  # unknown value and absent features read row 0 / 0
    rows = [state.user_rows.get(u, 0) for u in users]
    assert rows[-2:] == [0, 0] and sum(r > 0 for r in rows) >= 10
    categorical = {n: [f.get(n, "") for f in features] for n in state.tower.categorical}
    numeric = np.array([[f.get(n, 0.0) for n in NUMERIC] for f in features], np.float32)  # (B, F)
    with torch.no_grad():
        inputs = model.user_inputs(users, categorical, numeric)
        oracle = model.user_tower.from_id_vectors(torch.from_numpy(state.id_table[rows].copy()), inputs).numpy()  # (B, D)
    one_at_a_time = np.stack([state.tower.vector(state.id_table[r], f) for r, f in zip(rows, features)])
    np.testing.assert_allclose(one_at_a_time, oracle, rtol=0, atol=1e-6)
    np.testing.assert_allclose(state.tower.vectors(state.id_table[rows], categorical, numeric), oracle, rtol=0, atol=1e-6)
    assert one_at_a_time.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one_at_a_time, axis=1), 1.0, atol=1e-6)


def test_recall_returns_what_exact_search_over_the_online_model_returns(published):
    _, trainer, store, _, delta, samples = published
    state = load_state(store, delta)
    model = trainer.model  # the online trainer's state when the delta was cut
    items = model.catalogue_vectors().numpy()[: len(state.item_ids)]  # released catalogue = the full model's, in order
    assert list(model.catalogue.ids[: len(state.item_ids)]) == list(state.item_ids)
    oracle = ExactRetriever(items)
    known = [i for i in range(len(samples)) if samples.user_ids[i] in state.user_rows][:30]
    assert len(known) >= 10
    for i in known:
        features = features_of(samples, i)
        result = recall(state, samples.user_ids[i], features, 20)
        inputs = model.user_inputs(
            [samples.user_ids[i]], {k: [v] for k, v in features.items() if isinstance(v, str)}, samples.user_numeric[i : i + 1]
        )
        scores, indices = oracle.search(model.user_vectors(inputs).detach().numpy(), 20)
        assert result.item_ids == [state.item_ids[j] for j in indices[0]]
        np.testing.assert_allclose(result.scores, scores[0], atol=1e-5)
        assert not result.cold_start


def test_unknown_users_get_the_cold_start_row(published):
    _, _, store, _, delta, samples = published
    state = load_state(store, delta)
    features = features_of(samples, 0)
    stranger = recall(state, "never-seen-user", features, 10)
    other = recall(state, "another-stranger", features, 10)
    assert stranger.cold_start and stranger.user_event_time_ms is None
    assert stranger.item_ids == other.item_ids
    # the same as an explicit forward pass with row 0
    categorical, numeric = state.tower.parse_features(features)
    vector = state.tower.vectors(state.id_table[0:1], {k: [v] for k, v in categorical.items()}, numeric[None])
    _, indices = state.index.search(vector, 10)
    assert stranger.item_ids == [state.item_ids[j] for j in indices[0]]


def test_applying_a_delta_to_the_served_state_equals_loading_the_chain(published):
    _, _, store, full, delta, _ = published
    served = load_state(store, full)
    table_before = served.id_table.copy()
    incremental = load_state(store, delta, current=served)
    scratch = load_state(store, delta)
    assert incremental.chain == scratch.chain == (full, delta)
    assert set(incremental.user_rows) == set(scratch.user_rows)
    for user_id in scratch.user_rows:
        np.testing.assert_array_equal(incremental.id_table[incremental.user_rows[user_id]], scratch.id_table[scratch.user_rows[user_id]])
    np.testing.assert_array_equal(served.id_table, table_before)  # the state being served was not touched
    assert not incremental.id_table.flags.writeable and not scratch.id_table.flags.writeable
    assert incremental.newest_click_event_time_ms == scratch.newest_click_event_time_ms > 0


def test_a_release_whose_file_no_longer_matches_its_checksum_is_refused(published, tmp_path):
    _, _, store, full, delta, _ = published
    copy = ReleaseStore(tmp_path / "releases")
    shutil.copytree(store.root, copy.root)
    path = copy.get(full).file("index.faiss")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match=f"release {full}: .*index.faiss SHA-256"):
        load_state(copy, delta)  # the corrupt file is in the chain's root


@pytest.mark.parametrize(
    "features, message",
    [
        ({"favourite_colour": "red"}, "unknown user feature"),
        ({"city": 3}, "'city' is categorical and needs a string"),
        ({"activity_7d": "high"}, "'activity_7d' is numeric and needs a finite number"),
        ({"activity_7d": float("nan")}, "finite number"),
        ({"activity_7d": True}, "finite number"),
        ({"activity_7d": 1e39}, "within float32 range"),
        ({"activity_7d": 10**400}, "within float32 range, got 1000000"),  # an int beyond float: no OverflowError
        ({"city": "c" * 500}, None),  # a long value is only an unknown one
        ({f"f{i}": 1 for i in range(50)}, r"unknown user feature\(s\) \['f0', 'f1', .* and 40 more\]"),
    ],
)
def test_features_that_do_not_fit_the_tower_are_errors(published, features, message):
    _, _, store, full, *_ = published
    state = load_state(store, full)
    if message is None:
        assert len(recall(state, "u1", features, 5).item_ids) == 5
        return
    with pytest.raises(FeatureError, match=message):
        recall(state, "u1", features, 5)
