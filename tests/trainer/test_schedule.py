from __future__ import annotations

from datetime import date

from freshtower.trainer.schedule import DailyScheduler, days_due, event_clock_ms

from freshtower.app.simulator import synthetic_click_samples
from freshtower.core.batches import list_batches, write_batch, write_closed_through
from freshtower.core.eventtime import HOUR_MS, MINUTE_MS, day_start_ms
from tests.conftest import make_settings

D1, D2, D3 = date(2026, 11, 20), date(2026, 11, 21), date(2026, 11, 22)


def test_a_day_is_due_once_it_ended_plus_the_delay():
    now = day_start_ms(D3) + 600_000  # 00:10 on day 3
    assert days_due([D1, D2, D3], [], now, delay_ms=900_000) == [D1]  # day 2 waits for 00:15
    assert days_due([D1, D2, D3], [], now, delay_ms=0) == [D1, D2]
    assert days_due([D1, D2, D3], [D1], now, delay_ms=0) == [D2]  # trained days are not repeated


def test_event_time_scheduling_trains_each_completed_day_once(data_dir_with_batches):
    settings = make_settings(data_dir_with_batches, training={"full_clock": "event", "full_delay_seconds": 0})
    scheduler = DailyScheduler(settings)
    trained: list[str] = []
    scheduler.run_once(trained.append)
    # Batches of days 0-2 exist, the last ending at or just past midnight
    # of day 3 (late clicks): event time has passed the end of day 2.
    assert trained == ["2026-11-20", "2026-11-21", "2026-11-22"]


def test_wall_clock_scheduling_uses_the_clock(data_dir_with_batches):
    settings = make_settings(data_dir_with_batches, training={"full_clock": "wall", "full_delay_seconds": 900})
    scheduler = DailyScheduler(settings, clock=lambda: day_start_ms(D2) + 60_000)
    assert scheduler.due() == []  # 00:01: yesterday not yet due
    scheduler = DailyScheduler(settings, clock=lambda: day_start_ms(D2) + HOUR_MS)
    assert [d.isoformat() for d in scheduler.due()] == ["2026-11-20"]


def test_a_day_waits_for_the_partition_whose_windows_close_last(tmp_path):
    """Under load one partition's windows close minutes of event time after
    another's: the day is due only once the slowest has closed past it."""
    settings = make_settings(tmp_path, training={"full_clock": "event", "full_delay_seconds": 0})
    batches = settings.batches_dir
    midnight = day_start_ms(D2)
    for part, newest in (("p0", midnight + 5 * MINUTE_MS), ("p1", midnight - 10 * MINUTE_MS)):
        for start in (day_start_ms(D1) + HOUR_MS, newest - MINUTE_MS):
            samples = synthetic_click_samples(5, users=5, items=5, start_ms=start, span_ms=MINUTE_MS, seed=start % 97)
            write_batch(batches, start, start + MINUTE_MS, samples, part=part)
        write_closed_through(batches, part, newest)
    # The newest batch on disk (p0's) is past midnight; p1 still owes the day's last minutes.
    assert event_clock_ms(batches) == midnight - 10 * MINUTE_MS
    assert DailyScheduler(settings).due() == []
    write_closed_through(batches, "p1", midnight + MINUTE_MS)  # p1 closed past midnight, with no batch after it
    assert event_clock_ms(batches) == midnight + MINUTE_MS
    assert DailyScheduler(settings).due() == [D1]


def test_without_closed_window_records_the_newest_batch_is_the_clock(data_dir_with_batches):
    batches = data_dir_with_batches / "batches"
    assert event_clock_ms(batches) == max(r.manifest.window_end_ms for r in list_batches(batches))
