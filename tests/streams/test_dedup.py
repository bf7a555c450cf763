"""Copies of events that already left the join state count once, within
the horizon; older ones are dead-lettered as too late."""

from __future__ import annotations

import time
import tracemalloc
from collections import Counter

import msgspec

from freshtower.streams.dedup import JoinedIds
from freshtower.streams.join import JoinCore, JoinSettings, RawEvent

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


def test_memory_per_million_event_ids():
    ids = JoinedIds(horizon_ms=DAY_MS)
    n = 200_000
    tracemalloc.start()
    start = time.perf_counter()
    for hour in range(24):
        ids.add((f"clk-d0-r{hour}-{k}" for k in range(n // 24)), ts_ms=T0 + hour * 3_600_000)
    elapsed = time.perf_counter() - start
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_million_mb = size / len(ids) * 1_000_000 / 2**20
    print(f"{len(ids):,} IDs: {per_million_mb:.0f} MB per million, {elapsed / len(ids) * 1e6:.2f} us per ID added")
    assert len(ids) == n // 24 * 24 and per_million_mb < 120
    assert ids.seen_many(["clk-d0-r3-7", "clk-d0-r3-999999"]) == [True, False]
