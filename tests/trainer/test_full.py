from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from freshtower.trainer.artifacts import ArtifactError, full_models_dir, latest_full_model, load_full_model
from freshtower.trainer.full import NoBatchesError, split_holdout, train_full
from freshtower.trainer.learner import Learner
from freshtower.trainer.losses import NonFiniteLossError

from freshtower.core.batches import BatchFormatError, list_batches, write_batch
from tests.conftest import make_settings

DAY0, DAY1 = "2026-11-20", "2026-11-21"


def test_full_training_writes_a_versioned_artifact_with_lineage(data_dir_with_batches):
    settings = make_settings(data_dir_with_batches)
    first = train_full(settings, DAY0)
    assert first.ref.version == f"{DAY0}.1"
    manifest = first.ref.manifest
    assert manifest.parent is None and manifest.from_scratch is True
    day_files = list_batches(settings.batches_dir, DAY0)
    assert len(manifest.lineage) == len(day_files)
    assert {e.sha256 for e in manifest.lineage} == {r.manifest.sha256 for r in day_files}
    assert {e.role for e in manifest.lineage} == {"train", "holdout"}
    assert 0 < manifest.metrics["exact"]["recall@50"] <= 1
    assert manifest.metrics["faiss"]["recall@50"] == pytest.approx(manifest.metrics["exact"]["recall@50"])
    assert manifest.config["training"]["mode"] == "listwise"
    assert latest_full_model(full_models_dir(settings)).version == first.ref.version

    second = train_full(settings, DAY1)
    assert second.ref.manifest.parent == first.ref.version  # warm start from yesterday
    again = train_full(settings, DAY1)
    assert again.ref.version == f"{DAY1}.2" and again.ref.manifest.parent == first.ref.version

    # Warm start keeps yesterday's users: a user seen only on day 0 keeps a row.
    day0 = load_full_model(first.ref).model.user_ids
    day1 = load_full_model(second.ref).model.user_ids
    assert set(filter(None, day0.row_ids())) <= set(filter(None, day1.row_ids()))


def test_later_days_learn_more_than_the_first(data_dir_with_batches):
    settings = make_settings(data_dir_with_batches)
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


def test_holdout_is_the_trailing_batches():
    class Ref:
        def __init__(self, n, positives):
            self.n = n
            self.manifest = type("M", (), {"positives": positives})

    refs = [Ref(n, 10) for n in range(10)]
    train, holdout = split_holdout(refs, 0.2)
    assert [r.n for r in holdout] == [8, 9] and [r.n for r in train] == list(range(8))
    assert split_holdout(refs, 0.0) == (refs, [])


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
