"""The join split by input partition (``streams/partitions.py``): each
partition's windows are its own, so workers that split the partitions
write exactly what one worker writes."""

from __future__ import annotations

import random
import zlib

import pytest
from freshtower.streams.join import JoinSettings
from freshtower.streams.partitions import PartitionedJoin

from freshtower.app.simulator import Simulator, SimulatorConfig
from tests.streams.oracle import T0, assert_samples_match, expected_samples, raw_events
from tests.streams.test_join import Events

PARTITIONS = 4
TOPICS = ("impressions", "clicks", "rank-logs")
WORLD = SimulatorConfig(users=300, items=200, topics=8, requests_per_day=1500, seed=5)
NOW = T0 + 10 * 86_400_000  # wall clock: well after the simulated day


@pytest.fixture(scope="module")
def world():
    simulator = Simulator(WORLD)
    return raw_events(simulator, [0], PARTITIONS), expected_samples(simulator, [0])


def uneven_order(events, seed: int) -> list:
    """The events as a consumer might deliver them: chunks of up to 400
    from a random topic partition, so some run hours ahead of others."""
    queues: dict = {}
    for e in events:
        queues.setdefault((e.topic, e.partition), []).append(e)
    rng = random.Random(seed)
    order = []
    while queues:
        tp = rng.choice(sorted(queues))
        take = rng.randint(1, 400)
        order += queues[tp][:take]
        del queues[tp][:take]
        if not queues[tp]:
            del queues[tp]
    return order


def run_worker(partitions: set[int], events, micro_batch: int = 300) -> dict[tuple[int, int], list]:
    """A worker owning ``partitions``: its events in micro-batches, each
    topic partition caught up once its last event is processed; then idle
    until every window closed. Returns (partition, window start) -> samples."""
    join = PartitionedJoin(JoinSettings(), {}, {p: None for p in partitions})
    mine = [e for e in events if e.partition in partitions]
    assigned = {(t, p) for t in TOPICS for p in partitions}
    last = {(e.topic, e.partition): i for i, e in enumerate(mine)}
    windows: dict[tuple[int, int], list] = {}

    def collect(results):
        for partition, result in results:
            assert not result.dead_letters, result.dead_letters[:3]
            for w in result.closed:
                windows.setdefault((partition, w.start_ms), []).extend(w.samples)
            join.cores[partition].finalize()

    for start in range(0, len(mine), micro_batch):
        end = start + micro_batch
        caught_up = {tp for tp in assigned if last.get(tp, -1) < end}
        collect(join.process(mine[start:end], NOW, assigned, caught_up))
    collect(join.advance(3_600_000, NOW))  # idle: the clock runs on
    assert join.open_requests == 0 and join.counters["late_records"] == 0
    return windows


def test_each_partition_closes_its_own_windows_and_together_they_hold_the_simulators_samples(world):
    events, expected = world
    windows = run_worker(set(range(PARTITIONS)), uneven_order(events, seed=3))
    assert_samples_match([s for samples in windows.values() for s in samples], expected)
    for (partition, _), samples in windows.items():
        assert {zlib.crc32(s.user_id.encode()) % PARTITIONS for s in samples} == {partition}


def test_two_workers_splitting_the_partitions_write_exactly_the_batches_of_one(world):
    events, _ = world
    one = run_worker(set(range(PARTITIONS)), uneven_order(events, seed=4))
    first = run_worker({0, 2}, uneven_order(events, seed=5))
    second = run_worker({1, 3}, uneven_order(events, seed=6))
    assert not first.keys() & second.keys()

    def keyed(windows):
        return {key: sorted((s.request_id, s.item_id, s.label) for s in samples) for key, samples in windows.items()}

    assert keyed(first) | keyed(second) == keyed(one)  # the same files, record for record


def assigned_to(*partitions: int) -> set[tuple[str, int]]:
    return {(t, p) for t in TOPICS for p in partitions}


def test_an_idle_partition_follows_the_partitions_still_being_read():
    ev = Events()
    join = PartitionedJoin(JoinSettings(window_ms=60_000, lateness_ms=10_000, join_window_ms=300_000), {}, {0: None, 1: None})
    both = assigned_to(0, 1)
    # Partition 0: one impression, then nothing more (read to its end).
    join.process([ev.impression(T0, request="r0", user="u0", partition=0)], NOW, both, assigned_to(0))
    # Partition 1 is still being read and its time is unknown: 0 waits.
    assert join.cores[0].watermark_ms == T0 and join.cores[1].watermark_ms is None
    # Partition 1's impressions move on an hour (its other topics are read
    # to their end); partition 0 follows, so its label-0 window (impression
    # + 5 min join window) closes.
    reading = {("impressions", 1)}
    results = join.process([ev.impression(T0 + 3_600_000, request="r1", user="u1", partition=1)], NOW, both, both - reading)
    assert join.cores[0].watermark_ms == T0 + 3_600_000
    closed = {p: [w.start_ms for w in r.closed] for p, r in results if r.closed}
    assert closed == {0: [T0 + 300_000]}
    assert join.cores[1].open_from_ms == T0 + 3_600_000 - 60_000  # partition 1's own cut


def test_the_worker_keeps_only_the_states_of_its_partitions():
    requests = {"a": {"partition": 0, "user": "u", "impression": None, "pending_clicks": [], "rank": None}, "b": {"partition": 3}}
    join = PartitionedJoin(JoinSettings(), requests, {0: None, 1: None})
    assert set(requests) == {"a"} and join.open_requests == 1  # partition 3 belongs to another worker now


def test_a_topic_without_any_event_stops_holding_the_watermark_once_idle_after_the_last_message():
    # MovieLens has impressions and clicks but no rank logs. Replayed fast,
    # every message is processed before the empty rank-logs partition has
    # been idle long enough to leave the watermark; ``settle`` then lets it go.
    ev = Events()
    join = PartitionedJoin(JoinSettings(window_ms=60_000, lateness_ms=10_000, join_window_ms=300_000), {}, {0: None})
    assigned = assigned_to(0)
    messages = [ev.impression(T0, request="r0", user="u0", partition=0), ev.click(T0 + 1_000, request="r0", user="u0", partition=0)]
    not_yet_idle = {("impressions", 0), ("clicks", 0)}  # rank-logs: read to its end, but not for idle_seconds yet
    join.process(messages, NOW, assigned, not_yet_idle)
    assert join.watermark_ms is None
    assert join.advance(3_600_000, NOW) == []  # the idle clock alone cannot start from no watermark
    join.settle(NOW, assigned, assigned)
    assert join.watermark_ms == T0 + 1_000
    closed = [w for _, r in join.advance(3_600_000, NOW) for w in r.closed]  # the clock runs on: every window closes
    assert sorted((s.item_id, s.label) for w in closed for s in w.samples) == [("a", 1), ("b", 0), ("c", 0)]
