"""The freshness experiment on a small simulated world (real trainers, event-time replay)."""

from __future__ import annotations

import json
import math

import pytest

from freshtower.app.experiment_arms import ARMS, BASELINES, next_tick, run_arms
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
    # three days: the daily arm's freshness counts clicks from its first release on, which only the
    # second day's model (released on the third day) has learnt
    simulator.write_batches(tmp_path / "batches", range(3), settings.streams.window_seconds)
    results = {r.arm: r for r in run_arms(settings, tmp_path / "work", tmp_path / "batches", ks=(50, 100), report=lambda _: None)}
    assert set(results) == {a.name for a in ARMS} | set(BASELINES)
    for result in results.values():
        assert result.unit_count > 0 and 0 <= result.recall(50) <= result.recall(100) <= 1
    # Batches of one minute plus 10 s lateness, published every minute: a
    # click reaches serving within ~2 minutes; every 30 minutes: later;
    # only daily: hours later (the day's end, the delay, the training).
    one_minute, thirty, daily = (results[n] for n in ("full+inc/1min", "full+inc/30min", "daily-full"))
    assert one_minute.freshness_percentile(99) < 180
    assert one_minute.freshness_percentile(50) < thirty.freshness_percentile(50) < daily.freshness_percentile(50)
    assert daily.freshness_percentile(50) > 3600
    json.dumps([r.hourly(50) for r in results.values()])  # plain numbers, ready for results.json


@pytest.mark.slow
def test_the_experiment_trains_on_batches_a_real_streams_worker_cut_from_kafka(tmp_path, kafka_broker):
    from collections import Counter
    from datetime import date

    from datetime import UTC, datetime

    from freshtower.app.event_log import simulated_end_day, simulated_start_day
    from freshtower.app.experiment import experiment_settings
    from freshtower.app.streamed_batches import stream_to_batches
    from tests.streams.oracle import batch_keys, expected_samples

    # days in the past: the worker dead-letters events ahead of the clock
    start_day = simulated_start_day(simulated_end_day(datetime.now(UTC)), 3)
    simulator = Simulator(SimulatorConfig(users=300, items=200, topics=8, requests_per_day=1500, seed=4, start_day=start_day))
    settings = experiment_settings(make_settings(tmp_path / "unused").model_copy(update={"kafka": kafka_broker.bootstrap}))
    counts = simulator.write_events(tmp_path / "events.jsonl", range(2))
    written, figures = stream_to_batches(settings, tmp_path / "events.jsonl", tmp_path / "streamed", report=lambda _: None)
    # The worker's batches are exactly the simulator's own join: every sample once, nothing else.
    expected = Counter(expected_samples(simulator, range(2)).keys())
    assert batch_keys(written.batches_dir) == expected
    assert figures.events_read == sum(counts.values()) and figures.records == len(expected) and figures.dead_letters == 0
    assert written.topics.impressions != settings.topics.impressions  # a shared broker: topics of its own

    results = {r.arm: r for r in run_arms(settings, tmp_path / "work", written.batches_dir, baselines=False, report=lambda _: None)}
    assert set(results) == {a.name for a in ARMS}
    assert all(r.unit_count > 0 for r in results.values())
    assert results["full+inc/1min"].freshness_percentile(99) < 180 < results["daily-full"].freshness_percentile(50)


def _write_clicks(directory, rows):
    """rows: (user, item, ts, label) -> one batch file per minute window."""
    from freshtower.core.batches import Sample, write_batch

    by_window: dict[int, list] = {}
    for n, (user, item, ts, label) in enumerate(rows):
        by_window.setdefault(ts - ts % 60_000, []).append(Sample(user, item, label, ts, f"r{n}", 0))
    for start, samples in sorted(by_window.items()):
        write_batch(directory, start, start + 60_000, samples)


def test_units_flag_users_first_seen_that_day_and_items_born_that_day(tmp_path):
    from freshtower.app.experiment_units import units_from
    from freshtower.core.batches import FeatureSpec, list_batches

    day = 86_400_000
    d0 = 1_790_000_000_000 - 1_790_000_000_000 % day
    _write_clicks(tmp_path, [
        ("old", "i-old", d0 + 60_000, 1),  # day 0
        ("shown", "i-old", d0 + 120_000, 0),  # seen on day 0, not clicking
        ("old", "i-new", d0 + day + 60_000, 1),  # day 1: i-new born today
        ("old", "i-old", d0 + day + 90_000, 1),
        ("shown", "i-old", d0 + day + 3_600_000, 1),  # returning: seen yesterday without a click
        ("fresh", "i-new", d0 + day + 7_200_000, 1),  # first seen today
    ])
    units = {(u.user_id, u.hour_ms): u for u in units_from(list_batches(tmp_path), FeatureSpec((), (), ()), d0 + day)}
    old, shown, fresh = units["old", d0 + day], units["shown", d0 + day + 3_600_000], units["fresh", d0 + day + 7_200_000]
    assert not old.new_user and not shown.new_user and fresh.new_user
    assert old.clicked == {"i-new", "i-old"} and old.born_today == {"i-new"} and fresh.born_today == {"i-new"}
    assert shown.born_today == set() and [u.index for u in units_from(list_batches(tmp_path), FeatureSpec((), (), ()), 0)] == [0, 1, 2, 3]


def test_popular_baselines_count_only_clicks_whose_batch_was_ready(tmp_path):
    from freshtower.app.experiment_baselines import baseline_scores
    from freshtower.app.experiment_units import units_from
    from freshtower.core.batches import FeatureSpec, list_batches

    hour = 3_600_000
    t0 = 1_790_000_000_000 - 1_790_000_000_000 % hour
    rows = [("a", "day-hit", t0 + m * 60_000, 1) for m in range(5)]  # popular 2 hours before
    rows += [("b", "hour-hit", t0 + 2 * hour - 300_000 + s * 1000, 1) for s in range(3)]  # popular in the last hour
    rows += [("c", "too-late", t0 + 2 * hour + 1000 + s, 1) for s in range(9)]  # same minute as the unit: not ready
    rows += [("u", item, t0 + 2 * hour + 5_000 + n, 1) for n, item in enumerate(("day-hit", "hour-hit", "too-late"))]
    _write_clicks(tmp_path, rows)
    spec = FeatureSpec((), (), ())
    refs = list_batches(tmp_path)
    units = [u for u in units_from(refs, spec, t0 + 2 * hour) if u.user_id == "u"]
    scores = baseline_scores(refs, spec, units, (1, 2), lateness_ms=10_000)
    assert scores["popular/day"][0].recall == {1: 1 / 3, 2: 2 / 3}  # day-hit (5) then hour-hit (3); too-late not ready
    assert scores["popular/hour"][0].recall == {1: 1 / 3, 2: 1 / 3}  # only hour-hit in the last hour
    assert 0 <= scores["random"][0].recall[2] <= 2 / 3


@pytest.mark.slow
def test_a_catch_up_reaches_serving_only_as_fast_as_the_trainer_goes(tmp_path, monkeypatch):
    """Training time counts cumulatively: with every batch taking 55 s (a clock advanced by each learn_batch), the
    catch-up of ~15 batches after a re-base takes ~14 minutes and then drains at 5 s a minute, so the clicks of
    the following hours wait up to ~14 minutes for it; counting each batch's own time only (each one 55 s after the
    re-base) served every click within ~2 minutes."""
    import types

    from freshtower.app import experiment_arms
    from freshtower.trainer.online import OnlineTrainer

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(experiment_arms, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    real = OnlineTrainer.learn_batch

    def slow_learn_batch(self, ref, samples=None):
        clock.now += 55.0
        return real(self, ref, samples)

    monkeypatch.setattr(OnlineTrainer, "learn_batch", slow_learn_batch)
    simulator = Simulator(SimulatorConfig(users=300, items=200, topics=8, requests_per_day=1500, seed=5))
    settings = make_settings(tmp_path / "unused")
    simulator.write_batches(tmp_path / "batches", range(3), settings.streams.window_seconds)
    arms = [a for a in ARMS if a.name == "full+inc/1min"]
    (result,) = run_arms(settings, tmp_path / "work", tmp_path / "batches", arms=arms, ks=(50,), baselines=False, report=lambda _: None)
    assert result.freshness_percentile(100) > 10 * 60  # the clicks waiting for a catch-up
    assert result.freshness_percentile(50) < 5 * 60  # the rest: each minute's batch 55 s after it is ready


@pytest.mark.slow
def test_the_experiment_reports_intervals_baselines_and_the_cold_start_split(tmp_path):
    from freshtower.app.experiment import ExperimentOptions, run_experiment

    options = ExperimentOptions(
        out=tmp_path / "exp", world="large", seeds=2, days=2, users=300, items=2000, requests_per_day=1500, arms="all"
    )
    result = run_experiment(make_settings(tmp_path / "unused"), options, report=lambda _: None)
    print(result.table)
    (data,) = result.data_sets
    assert data.label == "simulator/large" and data.ks == (50, 200) and len(data.by_seed) == 2
    assert "± " in result.table and "full+inc/1min − daily-full" in result.table and "popular/hour" in result.table
    assert "Recall@50 new users" in result.table
    saved = json.loads(result.results_path.read_text())
    arms = saved["data_sets"][0]["arms"]
    assert set(arms) == {a.name for a in ARMS} | set(BASELINES)
    assert len(arms["daily-full"]["per_seed"]) == 2 and arms["daily-full"]["intervals"]["recall@50"]["method"] == "t"
    # the world brings new users and new items during day 1: the split has both sides
    per_seed = arms["popular/day"]["per_seed"][0]
    assert per_seed["units"] > 0 and not math.isnan(per_seed["click-recall@50/born-that-day"])
    assert sum(u.new_user for u in data.by_seed[0][0].units) > 0
    # the two seeds are different worlds, and the arms of one seed score the same units
    assert [r.unit_count for r in data.results_of("daily-full")] != [0, 0]
    assert data.results_of("daily-full")[0].unit_count == data.results_of("full+inc/1min")[0].unit_count


@pytest.mark.parametrize("serve_new_items", [True, False])
def test_online_releases_serve_items_born_today_as_the_publisher_setting_says(tmp_path, serve_new_items):
    """``publisher.new_item_vectors`` is the one switch: on, the online arm's releases serve the items first seen
    since their full model (so clicks on items born that day can be found); off, only the full model's items."""
    simulator = Simulator(SimulatorConfig(users=150, items=120, topics=4, requests_per_day=1500, seed=2, new_items_per_day=60, max_days=2))
    settings = make_settings(
        tmp_path / "unused", streams={"window_seconds": 600.0}, publisher={"new_item_vectors": serve_new_items}
    )
    simulator.write_batches(tmp_path / "batches", range(2), settings.streams.window_seconds)
    arm = next(a for a in ARMS if a.name == "full+inc/1min")
    (result,) = run_arms(settings, tmp_path / "work", tmp_path / "batches", arms=(arm,), ks=(60,), baselines=False, report=lambda _: None)
    born_clicks = sum(s.new_item_clicks for s in result.scores)
    assert born_clicks > 20
    found = result.click_recall(60, born_today=True)
    if serve_new_items:
        assert found > 0.1
    else:
        assert found == 0.0


def test_the_experiment_trains_its_models_in_enough_steps_a_day(tmp_path):
    """A simulated day of the large world holds ~30,000 clicks: at the trainer's 1,024 a minibatch that is 28 steps,
    and day 0's model found 0.005 of the next day's clicks in its top 50 (0.014 at 256). A batch size the user set
    is kept."""
    from freshtower.app.experiment import experiment_settings

    clicks_a_day = 30_000
    chosen = experiment_settings(make_settings(tmp_path / "unused")).training.batch_size
    assert clicks_a_day / chosen >= 100
    mine = experiment_settings(make_settings(tmp_path / "unused", training={"batch_size": 2048})).training.batch_size
    assert mine == 2048
