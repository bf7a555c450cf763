"""Copies of events that already left the join state count once, within
the horizon; older ones are dead-lettered as too late."""

from __future__ import annotations

import time
import tracemalloc
from collections import Counter

import msgspec
import orjson

from freshtower.streams.dedup import JoinedIds
from freshtower.streams.join import JoinCore, JoinSettings, RawEvent
from freshtower.streams.partitions import PartitionedJoin

from freshtower.app.simulator import Simulator, SimulatorConfig
from tests.streams.oracle import T0, assert_samples_match, expected_samples, raw_events, sample_key
from tests.streams.test_watermark import run_log

DAY_WORLD = SimulatorConfig(users=2000, items=500, topics=10, requests_per_day=12_000, seed=11)
DAY_MS = 86_400_000


def redelivered(events: list, offset: int = 1_000_000) -> list:
    """The same events again, later in their partitions (a producer or a mirror replaying them)."""
    return [RawEvent(e.topic, e.partition, e.offset + offset, e.key, e.value) for e in events]


def test_a_whole_day_delivered_again_after_it_was_written_writes_no_sample_twice():
    simulator = Simulator(DAY_WORLD)
    events = raw_events(simulator, [0])
    expected = expected_samples(simulator, [0])
    settings = JoinSettings()
    core = JoinCore(settings, {})
    # Just far enough for every window of the day to close: the day comes again right after.
    last_ts = max(msgspec.json.decode(e.value)["ts"] for e in events)
    first, dead = run_log(core, events, flush_to_ms=last_ts + settings.join_window_ms + settings.window_ms + settings.lateness_ms)
    assert not dead
    assert_samples_match(first, expected)
    assert core.open_requests == 0  # every request left the join state: only the horizon remembers them

    again, dead = run_log(core, redelivered(events))  # and time goes on: every window closes
    assert core.open_requests == 0
    assert Counter(sample_key(s) for s in again) == Counter(), f"{len(again):,} samples written again"
    assert not dead, Counter(d.code for d in dead)
    c = core.counters
    assert c["duplicates.impression"] == sum(1 for e in events if e.topic == "impressions")
    assert c["duplicates.click"] + c["duplicates.click_pair"] == sum(1 for e in events if e.topic == "clicks")


def test_a_copy_older_than_the_horizon_is_dead_lettered_as_too_late():
    simulator = Simulator(DAY_WORLD)
    events = raw_events(simulator, [0])[:3000]
    core = JoinCore(JoinSettings(dedup_horizon_ms=3_600_000), {})
    run_log(core, events)
    core.advance(core.watermark_ms + DAY_MS)
    core.finalize()
    samples, dead = run_log(core, redelivered(events[:50]))
    assert not samples
    assert {d.code for d in dead} == {"too_late"} and len(dead) == 50
    assert "dedup horizon" in dead[0].reason


def test_a_restarted_join_recognises_a_redelivered_day_from_the_chunk_records_alone():
    """A worker that restarts (or takes the partitions over) after every
    request left the join state has only the progress record and the chunk
    records of written-out IDs (what its changelogs hold): with them a whole
    day delivered again writes nothing and counts every copy as one;
    without them, as before, it took the copies for new, late events and
    dead-lettered them."""
    simulator = Simulator(DAY_WORLD)
    events = raw_events(simulator, [0])
    settings = JoinSettings()
    first = JoinCore(settings, {})
    last_ts = max(msgspec.json.decode(e.value)["ts"] for e in events)
    written, dead = run_log(first, events, flush_to_ms=last_ts + settings.join_window_ms + settings.window_ms + settings.lateness_ms)
    assert written and not dead and first.open_requests == 0
    records = [(key, orjson.loads(orjson.dumps(value))) for key, value in first.joined_ids.chunk_records()]  # through the changelog's JSON
    assert {value["partition"] for _, value in records} == {e.partition for e in events}
    assert first.joined_ids.chunk_records() == []  # each chunk is taken once

    def restarted(restore: bool) -> JoinCore:
        core = JoinCore(settings, {}, first.progress())
        if restore:
            for key, value in records:
                core.joined_ids.restore(key, value)
        return core

    again = restarted(restore=True)
    assert len(again.joined_ids) == len(first.joined_ids)
    samples, dead = run_log(again, redelivered(events))
    assert not samples and not dead, (len(samples), Counter(d.code for d in dead))
    assert sum(v for k, v in again.counters.items() if k.startswith("duplicates.")) == len(events)

    # What a restart did before the chunk records: the copies looked new, and behind the watermark
    # they were dead-lettered as late or too late (an operator re-feeding dead letters doubled them).
    forgetful = restarted(restore=False)
    samples, dead = run_log(forgetful, redelivered(events))
    assert len(samples) + len(dead) > 0.5 * len(events), (len(samples), Counter(d.code for d in dead))

    # Past the horizon the buckets expire, and every chunk record's key comes back for a tombstone.
    again.advance(again.watermark_ms + 2 * DAY_MS)
    assert len(again.joined_ids) == 0
    assert sorted(key for _, key in again.joined_ids.take_expired()) == sorted(key for key, _ in records)


def test_a_copy_on_another_partition_of_the_same_worker_counts_once():
    """The worker's partitions share one memory of written-out IDs, so a
    copy produced with another key or partitioner is recognised too."""
    simulator = Simulator(DAY_WORLD)
    events = [e for e in raw_events(simulator, [0])[:4000] if e.partition == 0]
    join = PartitionedJoin(JoinSettings(), {}, {p: None for p in range(4)})
    assert len({id(core.joined_ids) for core in join.cores.values()}) == 1
    assigned = {(e.topic, p) for e in events for p in range(4)}
    for at in range(0, len(events), 500):
        join.process(events[at : at + 500], T0 + 10 * DAY_MS, assigned, assigned - {(e.topic, 0) for e in events})
    join.advance(2 * DAY_MS, T0 + 10 * DAY_MS)
    for core in join.cores.values():
        core.finalize()
    assert join.cores[0].open_requests == 0
    impressions = [e for e in events if e.topic == "impressions"]
    copies = [RawEvent(e.topic, 1, e.offset, e.key, e.value) for e in impressions]
    results = join.process(copies, T0 + 10 * DAY_MS, assigned, set())
    assert not [d for _, r in results for d in r.dead_letters]
    assert join.counters["duplicates.impression"] == len(impressions)
    assert join.cores[1].open_requests == 0


def test_memory_per_million_event_ids():
    ids = JoinedIds(horizon_ms=DAY_MS)
    n = 200_000
    tracemalloc.start()
    start = time.perf_counter()
    for hour in range(24):
        ids.add((f"clk-d0-r{hour}-{k}" for k in range(n // 24)), ts_ms=T0 + hour * 3_600_000)
    elapsed = time.perf_counter() - start
    journal, _ = tracemalloc.get_traced_memory()
    assert ids.chunk_records()  # what the worker sends to its changelog at each finalize, and then forgets
    size, _ = tracemalloc.get_traced_memory()
    assert size < journal
    tracemalloc.stop()
    per_million_mb = size / len(ids) * 1_000_000 / 2**20
    print(f"{len(ids):,} IDs: {per_million_mb:.0f} MB per million ({journal / len(ids) * 1e6 / 2**20:.0f} before the chunk records were taken), "
          f"{elapsed / len(ids) * 1e6:.2f} us per ID added")
    assert len(ids) == n // 24 * 24 and per_million_mb < 120
    assert ids.seen_many(["clk-d0-r3-7", "clk-d0-r3-999999"]) == [True, False]
