"""When to run the daily full training.

Production runs on the wall clock: shortly after midnight (UTC) plus
``full_delay_seconds``, train yesterday. Replays run on event time: once
the stream has closed its windows past midnight plus the delay *in every
partition*, that day is complete and is trained at once, so a day of
replay takes minutes. Every partition, not the busiest: under load one
partition's windows close minutes of event time after another's, and a
clock taken from the newest batch on disk trained a day before the
lagging partitions' last batches of it existed (``event_clock_ms``).

``days_due`` is the pure rule; ``DailyScheduler`` is the thin loop around
it that ``freshtower train daily`` runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Callable, Iterable

from freshtower.trainer.artifacts import full_models_dir, list_full_models

from freshtower.core.batches import BatchRef, list_batches, read_closed_through
from freshtower.core.eventtime import DAY_MS, day_of, day_start_ms
from freshtower.core.settings import Settings

log = logging.getLogger(__name__)


def days_due(batch_days: Iterable[date], trained_days: Iterable[date], now_ms: int, delay_ms: int) -> list[date]:
    """Days that have batches, are not trained yet, and whose end plus the
    delay has passed ``now_ms`` (wall or event time), oldest first.

    >>> d = date(2026, 11, 20)
    >>> days_due([d], [], day_start_ms(d) + DAY_MS + 5, delay_ms=10)
    []
    >>> days_due([d], [], day_start_ms(d) + DAY_MS + 10, delay_ms=10)
    [datetime.date(2026, 11, 20)]
    """
    trained = set(trained_days)
    return sorted(d for d in set(batch_days) if d not in trained and day_start_ms(d) + DAY_MS + delay_ms <= now_ms)


def event_clock_ms(batches_dir, refs: list[BatchRef] | None = None) -> int:
    """Event time of the stream for the daily trainer: the earliest, over
    the writers that record it (``read_closed_through``: the streams
    worker's partitions), of the end of their closed windows, so a day is
    due only once no partition will write another batch of it. Batches
    without such a record (a writer that does not keep one) count by the
    end of the newest window on disk. 0 before anything was written.
    """
    closed = read_closed_through(batches_dir)
    if closed:
        return min(closed.values())
    refs = list_batches(batches_dir) if refs is None else refs
    return refs[-1].manifest.window_end_ms if refs else 0


@dataclass
class DailyScheduler:
    """Trains each completed day once, in order."""

    settings: Settings
    clock: Callable[[], int] = field(default=lambda: int(time.time() * 1000))  # wall clock, ms

    def event_time_now(self) -> int:
        """Event time: how far every partition has closed its windows (``event_clock_ms``)."""
        return event_clock_ms(self.settings.batches_dir)

    def due(self) -> list[date]:
        refs = list_batches(self.settings.batches_dir)
        batch_days = {day_of(r.window_start_ms) for r in refs}
        trained = {date.fromisoformat(r.day) for r in list_full_models(full_models_dir(self.settings))}
        now = self.event_time_now() if self.settings.training.full_clock == "event" else self.clock()
        delay = int(self.settings.training.full_delay_seconds * 1000)
        return days_due(batch_days, trained, now, delay)

    def run_once(self, train: Callable[[str], object]) -> list[str]:
        done = []
        for day in self.due():
            log.info("daily full training for %s", day.isoformat())
            train(day.isoformat())
            done.append(day.isoformat())
        return done

    def run(self, train: Callable[[str], object], should_stop: Callable[[], bool], poll_seconds: float = 5.0) -> None:
        while not should_stop():
            self.run_once(train)
            deadline = time.monotonic() + poll_seconds
            while time.monotonic() < deadline and not should_stop():
                time.sleep(min(0.2, poll_seconds))

