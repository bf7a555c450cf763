from __future__ import annotations

import hashlib

import numpy as np
import pytest
from freshtower.streams.dead_letters import decode_dead_letter, encode_dead_letter
from freshtower.streams.frequency_snapshots import load_snapshot, save_snapshot, snapshot_bytes
from freshtower.streams.join import ClosedWindow, DeadLetter
from freshtower.streams.sink import BatchSink

from freshtower.app.simulator import synthetic_click_samples
from freshtower.core.batches import BatchFormatError, list_batches, read_batch, read_closed_through, write_batch, write_closed_through
from freshtower.core.frequency import FrequencyEstimator
from tests.streams.oracle import SPEC, T0


def closed_window(start_ms: int, count: int, seed: int) -> ClosedWindow:
    samples = synthetic_click_samples(count, users=50, items=30, start_ms=start_ms, span_ms=60_000, seed=seed)
    return ClosedWindow(start_ms, start_ms + 60_000, samples, late_records=2)


def new_estimator() -> FrequencyEstimator:
    return FrequencyEstimator(buckets=1 << 12, hashes=2, alpha=0.05)


def test_a_frequency_snapshot_restores_the_exact_estimator(tmp_path):
    estimator = new_estimator()
    estimator.update([f"i{n % 37}" for n in range(500)])
    save_snapshot(estimator, tmp_path / "a.freq.npz")
    restored = load_snapshot(tmp_path / "a.freq.npz")
    for name in ("last_step", "gap", "sightings"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(estimator, name))
    assert (restored.step, restored.buckets, restored.hashes, restored.alpha) == (estimator.step, 4096, 2, 0.05)
    dense = FrequencyEstimator().state_dict()
    assert len(snapshot_bytes(estimator)) < sum(v.nbytes for v in dense.values()) / 1000  # touched cells only


def test_written_windows_are_announced_with_what_the_files_hold(tmp_path):
    sink = BatchSink(tmp_path, "writer-a", new_estimator())
    announcements = [sink.write(closed_window(T0 + n * 60_000, 40 + n, seed=n)) for n in range(3)]
    refs = list_batches(tmp_path)
    assert [r.window_start_ms for r in refs] == [a["window_start_ms"] for a in announcements]
    for ref, a in zip(refs, announcements):
        data = (tmp_path / a["path"]).read_bytes()
        assert a["sha256"] == hashlib.sha256(data).hexdigest() == ref.manifest.sha256
        assert (a["records"], a["positives"], a["late_records"]) == (ref.manifest.records, ref.manifest.positives, 2)
        assert len(read_batch(ref, SPEC, positives_only=False)) == a["records"]
        assert ref.manifest.extras["writer"] == "writer-a"
        assert (tmp_path / a["frequency_state"]).name == ref.manifest.extras["frequency_state"].split("/")[-1]


def test_the_snapshot_beside_each_batch_is_the_estimator_after_that_batch(tmp_path):
    sink = BatchSink(tmp_path, "w", new_estimator())
    windows = [closed_window(T0 + n * 60_000, 30, seed=n) for n in range(3)]
    for w in windows:
        sink.write(w)
    replayed = new_estimator()
    for w, ref in zip(windows, list_batches(tmp_path)):
        replayed.update(w.clicked_item_ids)
        snapshot = load_snapshot(ref.manifest_path.parent / ref.manifest.extras["frequency_state"])
        assert snapshot.step == replayed.step == ref.manifest.extras["frequency_step"]
        np.testing.assert_array_equal(snapshot.gap, replayed.gap)


def test_reopening_resumes_the_estimator_and_finds_this_writers_later_batches(tmp_path):
    sink = BatchSink(tmp_path, "w", new_estimator())
    for n in range(4):
        sink.write(closed_window(T0 + n * 60_000, 20, seed=n))
    # Another writer's batch (e.g. the simulator's) must never be touched.
    write_batch(tmp_path, T0 + 10 * 60_000, T0 + 11 * 60_000, closed_window(T0 + 10 * 60_000, 5, seed=9).samples)
    progress = {"frequency_window_ms": T0 + 60_000, "frequency_step": None}
    progress["frequency_step"] = load_snapshot(tmp_path / "2026-11-20" / "000100.freq.npz").step
    reopened = BatchSink.open(tmp_path, "w", new_estimator, progress, open_from_ms=T0 + 2 * 60_000)
    assert reopened.estimator.step == progress["frequency_step"]
    assert reopened.stale_windows == {T0 + 2 * 60_000, T0 + 3 * 60_000}
    # Window 2 is written again, window 3 closes empty this time: its old file goes.
    reopened.write(closed_window(T0 + 2 * 60_000, 20, seed=2))
    assert reopened.remove_stale(T0 + 2 * 60_000, T0 + 20 * 60_000) == [T0 + 3 * 60_000]
    assert [r.window_start_ms for r in list_batches(tmp_path)] == [T0, T0 + 60_000, T0 + 2 * 60_000, T0 + 10 * 60_000]


def test_a_partitions_sink_writes_its_own_files_and_resumes_from_them(tmp_path):
    sinks = {p: BatchSink(tmp_path, f"w{p}", new_estimator(), partition=p) for p in (0, 1)}
    for p, sink in sinks.items():
        for n in range(2):
            announcement = sink.write(closed_window(T0 + n * 60_000, 20, seed=10 * p + n))
            assert announcement["partition"] == p and announcement["path"].endswith(f"-p{p}.tfrecord")
    refs = list_batches(tmp_path)
    assert [(r.window_start_ms, r.manifest.extras["partition"]) for r in refs] == [(T0, 0), (T0, 1), (T0 + 60_000, 0), (T0 + 60_000, 1)]
    # Partition 1 reopened after its window T0 was closed for good: its own
    # snapshot, and only its own later batch may be replaced.
    step = load_snapshot(tmp_path / "2026-11-20" / "000000-p1.freq.npz").step
    reopened = BatchSink.open(tmp_path, "w1", new_estimator, {"frequency_window_ms": T0, "frequency_step": step}, T0 + 60_000, partition=1)
    assert reopened.estimator.step == step and reopened.stale_windows == {T0 + 60_000}
    assert reopened.remove_stale(T0 + 60_000, T0 + 120_000) == [T0 + 60_000]
    assert [r.manifest.file for r in list_batches(tmp_path)] == ["000000-p0.tfrecord", "000000-p1.tfrecord", "000100-p0.tfrecord"]


def test_a_snapshot_that_does_not_match_the_progress_is_refused(tmp_path):
    sink = BatchSink(tmp_path, "w", new_estimator())
    sink.write(closed_window(T0, 20, seed=1))
    with pytest.raises(RuntimeError, match="differs from the recorded"):
        BatchSink.open(tmp_path, "w", new_estimator, {"frequency_window_ms": T0, "frequency_step": 999}, open_from_ms=T0 + 60_000)


def test_a_dead_letter_keeps_the_original_bytes_and_where_they_came_from():
    letter = DeadLetter("invalid_json", "click: not valid JSON", "clicks", 3, 1234, b"u1", b"\x00\xffnot json")
    envelope = decode_dead_letter(encode_dead_letter(letter, keep_bytes=1024))
    assert envelope["value"] == letter.value and envelope["key"] == b"u1"
    assert envelope["source"] == {"topic": "clicks", "partition": 3, "offset": 1234}
    assert (envelope["code"], envelope["reason"], envelope["value_truncated"]) == ("invalid_json", "click: not valid JSON", False)


def test_an_oversized_dead_letter_keeps_a_prefix_its_size_and_checksum():
    value = b"x" * 1_000_000
    envelope = decode_dead_letter(encode_dead_letter(DeadLetter("oversized", "too big", "clicks", 0, 7, None, value), keep_bytes=4096))
    assert envelope["value"] == value[:4096] and envelope["value_truncated"] and envelope["key"] is None
    assert (envelope["value_bytes"], envelope["value_sha256"]) == (1_000_000, hashlib.sha256(value).hexdigest())


def test_a_sink_records_how_far_its_windows_are_closed_even_without_records(tmp_path):
    sink = BatchSink(tmp_path, "w0", new_estimator(), partition=0)
    sink.write(closed_window(T0, 20, seed=1))
    sink.closed_through(T0 + 60_000)
    sink.closed_through(T0 + 180_000)  # two windows closed empty: no batch, the record moves on
    assert read_closed_through(tmp_path) == {"p0": T0 + 180_000}
    assert [r.window_start_ms for r in list_batches(tmp_path)] == [T0]  # the marker is not a batch
    BatchSink(tmp_path, "w1", new_estimator()).closed_through(T0 + 60_000)  # an unnamed writer (one join over every partition)
    assert read_closed_through(tmp_path) == {None: T0 + 60_000, "p0": T0 + 180_000}
    (tmp_path / "closed-p0.json").write_text("{")
    with pytest.raises(BatchFormatError, match="closed-p0.json: unreadable closed-windows marker"):
        read_closed_through(tmp_path)
    with pytest.raises(ValueError, match="p<k>"):
        write_closed_through(tmp_path, "../x", 1)
