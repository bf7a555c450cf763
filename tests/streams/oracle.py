"""The simulator's ground truth as the oracle for the join, and helpers to
feed its events to the pure core (``JoinCore``) or read batches back."""

from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path

import msgspec
from freshtower.streams.join import RawEvent

from freshtower.app.simulator import Simulator
from freshtower.core.batches import FeatureSpec, Sample, list_batches, read_batch

T0 = 1_795_132_800_000  # 2026-11-20 00:00:00 UTC, the simulator's day 0
SPEC = FeatureSpec(("age_bucket", "city", "device"), ("activity_7d", "hour_sin", "hour_cos"), ("category",))


def raw_events(simulator: Simulator, days, partitions: int = 4) -> list[RawEvent]:
    """The simulator's events as Kafka would deliver them, in event-time
    order, each on partition ``crc32(user) % partitions`` of its topic."""
    offsets: Counter = Counter()
    out = []
    for day in days:
        for topic, event in simulator.events(day):
            partition = zlib.crc32(event["user_id"].encode()) % partitions
            out.append(RawEvent(topic, partition, offsets[topic, partition], event["user_id"].encode(), msgspec.json.encode(event)))
            offsets[topic, partition] += 1
    return out


def sample_key(sample) -> tuple[str, str, int]:
    return (sample.request_id, sample.item_id, int(sample.label))


def expected_samples(simulator: Simulator, days) -> dict[tuple[str, str, int], Sample]:
    return {sample_key(s): s for day in days for s in simulator.samples(day)}


def batch_keys(batches_dir: Path) -> Counter:
    """(request_id, item_id, label) -> how many batch records hold it."""
    keys: Counter = Counter()
    for ref in list_batches(batches_dir):
        columns = read_batch(ref, SPEC, positives_only=False, verify_checksum=True)
        keys.update(zip(columns.request_ids, columns.item_ids, columns.labels.tolist()))
    return keys


def assert_samples_match(actual: list, expected: dict) -> None:
    """Every expected sample exactly once, with the right time, features,
    hard negatives and teacher score; nothing else."""
    keys = Counter(sample_key(s) for s in actual)
    duplicated = [k for k, n in keys.items() if n > 1]
    missing = set(expected) - set(keys)
    unexpected = set(keys) - set(expected)
    assert not duplicated, f"{len(duplicated)} samples appear more than once, e.g. {duplicated[:3]}"
    assert not missing, f"{len(missing)} samples missing, e.g. {sorted(missing)[:3]}"
    assert not unexpected, f"{len(unexpected)} unexpected samples, e.g. {sorted(unexpected)[:3]}"
    for s in actual:
        e = expected[sample_key(s)]
        assert (s.user_id, s.event_time_ms, s.position) == (e.user_id, e.event_time_ms, e.position), (s, e)
        assert dict(s.user_categorical) == dict(e.user_categorical) and dict(s.item_categorical) == dict(e.item_categorical), (s, e)
        assert s.user_numeric.keys() == e.user_numeric.keys() and all(
            abs(s.user_numeric[k] - e.user_numeric[k]) < 1e-6 for k in s.user_numeric
        )
        assert tuple(s.hard_negative_ids) == tuple(e.hard_negative_ids), (s, e)
        assert abs(s.teacher_score - e.teacher_score) < 1e-4, (s, e)  # the rank log rounds scores to 4 decimals


def stream_batches(simulator: Simulator, days, batches_dir: Path, join_window_ms: int = 600_000, category: str = "category") -> None:
    """The simulator's events of ``days`` through one partition's join and
    sink (ranking samples and statistics rows included), every window closed."""
    import json

    from freshtower.streams.join import JoinCore, JoinSettings
    from freshtower.streams.ranking_samples import RankingSampleEmitter
    from freshtower.streams.sink import BatchSink

    from freshtower.core.frequency import FrequencyEstimator

    settings = JoinSettings(window_ms=60_000, lateness_ms=10_000, join_window_ms=join_window_ms)
    sink = BatchSink(batches_dir, "w", FrequencyEstimator(buckets=1 << 12, hashes=2, alpha=0.05), partition=0,
                     emitter=RankingSampleEmitter(category, "rank", join_window_ms))
    core = JoinCore(settings, {}, partition=0)
    events = raw_events(simulator, days, partitions=1)
    for start in range(0, len(events), 500):
        chunk = events[start : start + 500]
        for window in core.process(chunk, now_ms=json.loads(chunk[-1].value)["ts"]).closed:
            sink.write(window)
        core.finalize()
    for window in core.advance(simulator.day_start_ms(max(days) + 1) + 2 * join_window_ms).closed:
        sink.write(window)
    core.finalize()
