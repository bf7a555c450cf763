from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from freshtower.trainer.artifacts import ArtifactError, full_models_dir, latest_full_model, load_full_model
from freshtower.trainer.full import NoBatchesError, holdout_batches, train_full
from freshtower.trainer.learner import Learner
from freshtower.trainer.losses import NonFiniteLossError

from freshtower.core.batches import BatchFormatError, FeatureSpec, list_batches, read_batch, write_batch
from tests.conftest import make_settings

DAY0, DAY1, DAY2 = "2026-11-20", "2026-11-21", "2026-11-22"


def test_full_training_writes_a_versioned_artifact_with_lineage(data_dir_with_batches):
    settings = make_settings(data_dir_with_batches)
    first = train_full(settings, DAY0)
    assert first.ref.version == f"{DAY0}.1"
    manifest = first.ref.manifest
    assert manifest.parent is None and manifest.from_scratch is True
    day_files = list_batches(settings.batches_dir, DAY0)
    trained = [e for e in manifest.lineage if e.role == "train"]
    assert {e.sha256 for e in trained} == {r.manifest.sha256 for r in day_files}  # every batch of the day
    held = [e for e in manifest.lineage if e.role == "holdout"]
    assert held and all(e.file.startswith(f"{DAY1}/") for e in held)  # the next day's first minutes
    assert manifest.data_end_ms == day_files[-1].manifest.window_end_ms
    assert manifest.holdout_end_ms - manifest.holdout_start_ms == settings.training.holdout_seconds * 1000
    assert 0 < manifest.metrics["exact"]["recall@50"] <= 1
    assert manifest.metrics["faiss"]["recall@50"] == pytest.approx(manifest.metrics["exact"]["recall@50"])
    assert manifest.config["training"]["mode"] == "listwise"
    assert latest_full_model(full_models_dir(settings)).version == first.ref.version

    second = train_full(settings, DAY1)
    assert second.ref.manifest.parent == first.ref.version  # warm start from yesterday
    # the parent is scored on the same holdout clicks: the gate's paired baseline
    assert second.metrics["parent"]["version"] == first.ref.version
    assert 0 <= second.metrics["parent"]["exact"]["recall@50"] <= 1
    again = train_full(settings, DAY1)
    assert again.ref.version == f"{DAY1}.2" and again.ref.manifest.parent == first.ref.version

    # Warm start keeps yesterday's users: a user seen only on day 0 keeps a row.
    day0 = load_full_model(first.ref).model.user_ids
    day1 = load_full_model(second.ref).model.user_ids
    assert set(filter(None, day0.row_ids())) <= set(filter(None, day1.row_ids()))


def test_later_days_learn_more_than_the_first(data_dir_with_batches):
    # An hour of the next day as the holdout: ~400 clicks in this small world, not ~65.
    settings = make_settings(data_dir_with_batches, training={"holdout_seconds": 3600})
    first = train_full(settings, DAY0).metrics["exact"]["recall@50"]
    warm = train_full(settings, DAY1).metrics["exact"]["recall@50"]
    print(f"holdout Recall@50: day 0 from scratch {first:.4f}, day 1 warm-started {warm:.4f}")
    assert warm > first


def test_training_order_is_shuffled_across_files(data_dir_with_batches, monkeypatch):
    settings = make_settings(data_dir_with_batches, training={"batch_size": 256, "shuffle_shards": 3})
    spans: list[tuple[int, bool]] = []
    original = Learner.learn

    def recording_learn(self, samples, where="", observe=True):
        times = samples.event_time_ms
        spans.append((int(times.max() - times.min()), bool(np.all(np.diff(times) >= 0))))
        return original(self, samples, where, observe)

    monkeypatch.setattr(Learner, "learn", recording_learn)
    train_full(settings, DAY0)
    hour = 3_600_000
    # Each minibatch mixes samples from across the day, in no time order.
    assert all(span > 12 * hour for span, _ in spans)
    assert not any(is_sorted for _, is_sorted in spans)


def test_holdout_is_the_first_minutes_of_the_next_day(data_dir_with_batches):
    batches = data_dir_with_batches / "batches"
    start, end, refs = holdout_batches(batches, DAY0, 1800)
    next_day = list_batches(batches, DAY1)
    assert start == next_day[0].window_start_ms and end == start + 1_800_000
    assert refs == next_day[:3]  # ten-minute test windows: the first three
    assert holdout_batches(batches, "2026-11-25", 600)[2] == []  # no next day yet: an empty holdout


def _click_keys(samples) -> set[tuple[str, str, str, int]]:
    clicked = np.flatnonzero(samples.labels == 1).tolist()
    return {(samples.request_ids[i], samples.user_ids[i], samples.item_ids[i], int(samples.event_time_ms[i])) for i in clicked}


def test_every_click_of_three_days_trains_a_full_model(data_dir_with_batches, monkeypatch):
    # All of each day's data, shuffled, one epoch: the clicks handed to the
    # learner by the three daily models, taken together, are exactly the
    # clicks joined into those days' batches. A trailing holdout of 5%
    # would leave ~1,000 of ~21,000 clicks to no full model.
    settings = make_settings(data_dir_with_batches)
    trained: list[tuple] = []
    learnt = 0
    original = Learner.learn

    def recording_learn(self, samples, where="", observe=True):
        nonlocal learnt
        trained.extend(_click_keys(samples))
        result = original(self, samples, where, observe)
        learnt += result.samples
        return result

    monkeypatch.setattr(Learner, "learn", recording_learn)
    for day in (DAY0, DAY1, DAY2):
        train_full(settings, day)
    spec = FeatureSpec.from_model(settings.model)
    refs = [r for day in (DAY0, DAY1, DAY2) for r in list_batches(settings.batches_dir, day)]
    joined = set().union(*(_click_keys(read_batch(r, spec)) for r in refs))
    assert len(joined) == sum(r.manifest.positives for r in refs)  # a click's key is unique
    print(f"three days: {len(joined):,} clicks joined, {len(set(trained)):,} distinct trained by full models "
          f"({len(trained):,} handed to the learner; {learnt:,} positives after re-sampling)")
    assert len(trained) == len(set(trained)) == len(joined)  # each once: one epoch
    assert set(trained) == joined


def test_warm_starts_decay_the_adagrad_sums(data_dir_with_batches):
    # Plain Adagrad sums only grow, so a row learnt on d days steps ~1/sqrt(d)
    # as far as a new one. The warm start multiplies them by accumulator_decay
    # (0.5): a user absent on day 1 leaves day 1 with half its day-0 sum.
    settings = make_settings(data_dir_with_batches)
    first = train_full(settings, DAY0).ref
    second = train_full(settings, DAY1).ref
    day0, day1 = load_full_model(first), load_full_model(second)
    spec = FeatureSpec.from_model(settings.model)
    day1_users = {u for r in list_batches(settings.batches_dir, DAY1) for u in read_batch(r, spec).user_ids}
    absent = [u for u in filter(None, day0.model.user_ids.row_ids()) if u not in day1_users]
    rows = day0.model.user_ids.lookup(absent)
    assert np.all(day1.model.user_ids.lookup(absent) == rows)
    sums0, sums1 = day0.optimizer_state["tables"][0], day1.optimizer_state["tables"][0]
    rows = rows[sums0[rows].numpy() > 0]  # rows that learnt on day 0
    assert len(rows) >= 5
    print(f"{len(rows)} rows absent on day 1: day-1 sum / day-0 sum, median {np.median((sums1[rows] / sums0[rows]).numpy()):.3f}")
    np.testing.assert_allclose(sums1[rows].numpy(), 0.5 * sums0[rows].numpy(), rtol=1e-6)


def test_nan_loss_stops_and_writes_nothing(data_dir_with_batches, small_simulator):
    settings = make_settings(data_dir_with_batches)
    window = list_batches(settings.batches_dir, DAY0)[3].manifest
    # A producer sent NaN for a continuous feature in one ten-minute window.
    poisoned = [
        replace(s, user_numeric={"activity_7d": float("nan")})
        for s in small_simulator.samples(0)
        if window.window_start_ms <= s.event_time_ms < window.window_end_ms
    ]
    write_batch(settings.batches_dir, window.window_start_ms, window.window_end_ms, poisoned)
    with pytest.raises(NonFiniteLossError, match=DAY0):
        train_full(settings, DAY0)
    assert latest_full_model(full_models_dir(settings)) is None
    assert not any(full_models_dir(settings).glob("2026-*"))


def test_corrupt_batch_stops_with_file_and_offset(data_dir_with_batches):
    settings = make_settings(data_dir_with_batches)
    ref = list_batches(settings.batches_dir, DAY0)[5]
    data = bytearray(ref.path.read_bytes())
    data[40] ^= 0xFF
    ref.path.write_bytes(bytes(data))
    with pytest.raises(BatchFormatError) as caught:
        train_full(settings, DAY0)
    assert str(ref.path) in str(caught.value) and "byte offset 0" in str(caught.value)
    assert latest_full_model(full_models_dir(settings)) is None


def test_missing_day_and_changed_shape_are_clear_errors(data_dir_with_batches):
    settings = make_settings(data_dir_with_batches)
    with pytest.raises(NoBatchesError, match="2026-01-01"):
        train_full(settings, "2026-01-01")
    train_full(settings, DAY0)
    wider = make_settings(data_dir_with_batches, model={"id_dim": 32})
    with pytest.raises(ArtifactError, match="--from-scratch"):
        train_full(wider, DAY1)
    assert train_full(wider, DAY1, from_scratch=True).ref.manifest.from_scratch is True


def test_a_tampered_artifact_is_refused(data_dir_with_batches):
    settings = make_settings(data_dir_with_batches)
    ref = train_full(settings, DAY0).ref
    weights = ref.path / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"x")
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_full_model(ref)
    with pytest.raises(ArtifactError):
        train_full(settings, DAY1)
    assert json.loads((ref.path / "manifest.json").read_text())["version"] == ref.version
    assert latest_full_model(full_models_dir(settings)).version == ref.version
