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


def _join_with_a_crc32_click_producer(events, reroute: bool):
    """The world's events with impressions and rank logs placed by murmur2
    and the clicks of odd users by CRC32 (librdkafka's default, as
    ``raw_events`` placed them), joined by one worker that reads the inputs
    and their repartition topics; what it reroutes is read back on the
    next micro-batch. A source is caught up once nothing more is to come
    on it (forwarded copies included)."""
    from freshtower.streams.join import DEFAULT_KINDS, RawEvent
    from freshtower.streams.placement import Placement

    placement = Placement(PARTITIONS)
    placed, misplaced = [], 0
    for e in events:
        target = placement.partition(e.key)
        if e.topic == "clicks" and int(e.key[1:]) % 2 == 1:
            misplaced += e.partition != target
            placed.append(e)  # CRC32's partition
        else:
            placed.append(RawEvent(e.topic, target, e.offset, e.key, e.value))
    settings = JoinSettings(partitions=PARTITIONS, repartition=tuple((t, f"{t}-repartition") for t in TOPICS) if reroute else ())
    kinds = {**DEFAULT_KINDS, **{f"{t}-repartition": kind for t, kind in DEFAULT_KINDS.items()}}
    join = PartitionedJoin(settings, {}, {p: None for p in range(PARTITIONS)}, kinds)
    assigned = {(t, p) for t in kinds for p in range(PARTITIONS)}

    def forwarded_source(e):
        target = placement.partition(e.key)
        return (f"{e.topic}-repartition", target) if e.partition != target and reroute else None

    samples, dead, forwarded = [], [], []
    start = 0
    while start < len(placed) or forwarded:
        batch, forwarded = forwarded + placed[start : start + 300], []
        to_come = {(e.topic, e.partition) for e in batch} | {(e.topic, e.partition) for e in placed[start + 300 :]}
        to_come |= {forwarded_source(e) for e in placed[start:]} - {None}
        start += 300
        for partition, result in join.process(batch, NOW, assigned, assigned - to_come):
            dead += result.dead_letters
            samples += [s for w in result.closed for s in w.samples]
            forwarded += [RawEvent(f"{m.topic}-repartition", target, m.offset, m.key, m.value) for m, target in result.rerouted]
            join.cores[partition].finalize()
    for partition, result in join.advance(3_600_000, NOW):
        samples += [s for w in result.closed for s in w.samples]
    return join, samples, dead, misplaced


def test_events_on_the_wrong_partition_are_rerouted_and_join_as_if_the_producer_had_used_murmur2(world):
    events, expected = world
    join, samples, dead, misplaced = _join_with_a_crc32_click_producer(events, reroute=True)
    assert misplaced > 100
    assert not dead, dead[:3]
    assert_samples_match(samples, expected)
    assert sum(v for k, v in join.counters.items() if k.startswith("rerouted.")) == join.counters["rerouted.click"] == misplaced
    assert sum(v for k, v in join.counters.items() if k.startswith("events_in.")) == len(events)  # each counted once, where joined
    # Without the repartition topic the same clicks are dead-lettered, saying what the producer must set.
    join, samples, dead, misplaced = _join_with_a_crc32_click_producer(events, reroute=False)
    assert len(dead) == misplaced and all(d.code == "wrong_partitioner" and "murmur2_random" in d.reason for d in dead)
    assert sum(1 for s in samples if s.label == 1) < sum(1 for s in expected.values() if s.label == 1)


def _user_on(partition: int, partitions: int = 2) -> str:
    from freshtower.streams.placement import Placement

    placement = Placement(partitions)
    return next(u for u in (f"u{i}" for i in range(1000)) if placement.partition(u.encode()) == partition)


def test_a_partition_waits_for_the_copies_a_batch_sends_to_it_even_if_its_repartition_topic_was_idle():
    ev = Events()
    settings = JoinSettings(window_ms=60_000, lateness_ms=10_000, join_window_ms=300_000, partitions=2,
                            repartition=tuple((t, f"{t}-again") for t in TOPICS))
    from freshtower.streams.join import DEFAULT_KINDS

    kinds = {**DEFAULT_KINDS, **{f"{t}-again": k for t, k in DEFAULT_KINDS.items()}}
    join = PartitionedJoin(settings, {}, {0: None, 1: None}, kinds)
    assigned = {(t, p) for t in kinds for p in (0, 1)}
    u0, u1 = _user_on(0), _user_on(1)
    # Partition 1's user, its impression on 1; its click placed on partition 0 by another partitioner.
    join.process([ev.impression(T0, request="r1", user=u1, partition=1)], NOW, assigned, assigned - {("impressions", 1)})
    assert join.cores[1].watermark_ms == T0
    # One batch: partition 0 an hour on, and partition 1's misplaced click. Everything is read to its
    # end, yet partition 1's watermark must wait for the click's copy on clicks-again/1.
    batch = [ev.impression(T0 + 3_600_000, request="r0", user=u0, partition=0), ev.click(T0 + 1_000, request="r1", user=u1, partition=0)]
    results = join.process(batch, NOW, assigned, assigned)
    assert [(m.topic, target) for p, r in results for m, target in r.rerouted] == [("clicks", 1)]
    assert join.cores[1].watermark_ms == T0 and not any(r.closed for p, r in results if p == 1)
    # The copy arrives: it joins, and only then do partition 1's windows close, with the click.
    copy = ev.click(T0 + 1_000, request="r1", user=u1, partition=1)
    copy = type(copy)("clicks-again", 1, 0, copy.key, copy.value)
    results = join.process([copy], NOW, assigned, assigned)
    closed = [s for p, r in results if p == 1 for w in r.closed for s in w.samples]
    closed += [s for p, r in join.advance(3_600_000, NOW) if p == 1 for w in r.closed for s in w.samples]
    assert sorted((s.item_id, s.label) for s in closed) == [("a", 1), ("b", 0), ("c", 0)]
    assert join.counters["late_records"] == 0 and join.counters["rerouted.click"] == 1


def test_a_worker_restarted_after_the_last_event_starts_its_watermark_at_the_recovered_state():
    # Every event was read and is in the join state, but no window closed before the restart: with
    # nothing new to read, the watermark starts at the state's latest event instead of waiting.
    ev = Events()
    settings = JoinSettings(window_ms=60_000, lateness_ms=10_000, join_window_ms=300_000)
    requests: dict = {}
    first = PartitionedJoin(settings, requests, {0: None})
    first.process([ev.impression(T0, request="r0", user="u0"), ev.click(T0 + 2_000, request="r0", user="u0")], NOW, assigned_to(0), set())
    assert first.watermark_ms is None  # its sources never went idle
    again = PartitionedJoin(settings, requests, {0: None})
    again.settle(NOW, assigned_to(0), assigned_to(0))
    assert again.watermark_ms == T0 + 2_000
    closed = [s for _, r in again.advance(3_600_000, NOW) for w in r.closed for s in w.samples]
    assert sorted((s.item_id, s.label) for s in closed) == [("a", 1), ("b", 0), ("c", 0)]
