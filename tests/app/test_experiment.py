"""The freshness experiment on a small simulated world (real trainers, event-time replay)."""

from __future__ import annotations

import json

import pytest

from freshtower.app.experiment import format_table
from freshtower.app.experiment_arms import ARMS, next_tick, run_arms
from freshtower.app.simulator import Simulator, SimulatorConfig
from tests.conftest import make_settings


def test_publish_ticks_round_up_to_the_interval():
    assert next_tick(0, 60_000) == 0
    assert next_tick(59_999, 60_000) == 60_000
    assert next_tick(1_800_001, 1_800_000) == 3_600_000


def test_units_know_what_their_user_clicked_in_earlier_hours(tmp_path):
    from freshtower.app.experiment_arms import units_from
    from freshtower.core.batches import FeatureSpec, Sample, list_batches, write_batch

    t0 = 1_790_000_000_000 - 1_790_000_000_000 % 3_600_000
    clicks = [("u1", "i1", t0 + 60_000), ("u1", "i2", t0 + 120_000), ("u2", "i3", t0 + 180_000), ("u1", "i4", t0 + 3_600_000 + 60_000)]
    for n, (user, item, ts) in enumerate(clicks):
        write_batch(tmp_path, ts - ts % 60_000, ts - ts % 60_000 + 60_000, [Sample(user, item, 1, ts, f"r{n}", 0)])
    spec = FeatureSpec((), (), ())
    units = units_from(list_batches(tmp_path), spec, t0 + 150_000)  # scoring starts after u1's first two clicks
    by_key = {(u.user_id, u.hour_ms): u for u in units}
    assert set(by_key) == {("u2", t0), ("u1", t0 + 3_600_000)}
    assert by_key["u2", t0].seen == frozenset() and by_key["u2", t0].clicked == {"i3"}
    assert by_key["u1", t0 + 3_600_000].seen == {"i1", "i2"} and by_key["u1", t0 + 3_600_000].clicked == {"i4"}


@pytest.mark.slow
def test_the_arms_differ_in_freshness_as_their_publishing_does(tmp_path):
    simulator = Simulator(SimulatorConfig(users=300, items=200, topics=8, requests_per_day=2000, seed=3))
    settings = make_settings(tmp_path / "unused")
    simulator.write_batches(tmp_path / "batches", range(2), settings.streams.window_seconds)
    results = {r.arm: r for r in run_arms(settings, tmp_path / "work", tmp_path / "batches", report=lambda _: None)}
    assert set(results) == {a.name for a in ARMS}
    print(format_table([("sim", r) for r in results.values()]))
    for result in results.values():
        assert result.units > 0 and 0 <= result.recall[50] <= result.recall[100] <= 1
    # Batches of one minute plus 10 s lateness, published every minute: a
    # click reaches serving within ~2 minutes; every 30 minutes: later;
    # only daily: hours later (the day's end, the delay, the training).
    one_minute, thirty, daily = (results[n] for n in ("full+inc/1min", "full+inc/30min", "daily-full"))
    assert one_minute.freshness_percentile(99) < 180
    assert one_minute.freshness_percentile(50) < thirty.freshness_percentile(50) < daily.freshness_percentile(50)
    assert daily.freshness_percentile(50) > 3600
    json.dumps([r.hourly for r in results.values()])  # plain numbers, ready for results.json


@pytest.mark.slow
def test_the_experiment_trains_on_batches_a_real_streams_worker_cut_from_kafka(tmp_path, kafka_broker):
    from collections import Counter
    from datetime import date

    from freshtower.app.event_log import simulated_start_day
    from freshtower.app.experiment import experiment_settings
    from freshtower.app.streamed_batches import stream_to_batches
    from tests.streams.oracle import batch_keys, expected_samples

    # days in the past: the worker dead-letters events ahead of the clock
    start_day = simulated_start_day(date.today(), 3)
    simulator = Simulator(SimulatorConfig(users=300, items=200, topics=8, requests_per_day=1500, seed=4, start_day=start_day))
    settings = experiment_settings(make_settings(tmp_path / "unused").model_copy(update={"kafka": kafka_broker.bootstrap}))
    counts = simulator.write_events(tmp_path / "events.jsonl", range(2))
    written, figures = stream_to_batches(settings, tmp_path / "events.jsonl", tmp_path / "streamed", report=lambda _: None)
    # The worker's batches are exactly the simulator's own join: every sample once, nothing else.
    expected = Counter(expected_samples(simulator, range(2)).keys())
    assert batch_keys(written.batches_dir) == expected
    assert figures.events_read == sum(counts.values()) and figures.records == len(expected) and figures.dead_letters == 0
    assert written.topics.impressions != settings.topics.impressions  # a shared broker: topics of its own

    results = {r.arm: r for r in run_arms(settings, tmp_path / "work", written.batches_dir, report=lambda _: None)}
    assert set(results) == {a.name for a in ARMS}
    print(format_table([("sim via kafka", r) for r in results.values()]))
    assert all(r.units > 0 for r in results.values())
    assert results["full+inc/1min"].freshness_percentile(99) < 180 < results["daily-full"].freshness_percentile(50)
