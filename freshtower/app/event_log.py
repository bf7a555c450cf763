"""The event log that ``freshtower run`` replays through Kafka: the
simulator's days, a JSONL file (``simulate --events`` format), or
MovieLens-100k compressed into a few days.

The simulator makes its days in a background thread and hands each one to
the replay as soon as it is made (so the replay starts after the first day
is simulated, not the last); the log is also written to disk, in the
format ``freshtower replay`` reads. ``ReplayThread`` produces a log to
Kafka in a thread that the supervisor watches.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import orjson
from freshtower.streams.replay import LoggedEvent, load_event_log, replay_events

from freshtower.app import movielens
from freshtower.app.simulator import Simulator
from freshtower.core.eventtime import DAY_MS
from freshtower.core.settings import Settings


class EventLog:
    """Events in event-time order. Iterating yields them for the replay,
    waiting for days still being made; ``events`` holds those made so far."""

    def __init__(self, path: Path, description: str, events: list[LoggedEvent] | None = None):
        self.path = path
        self.description = description
        self.events: list[LoggedEvent] = events or []
        self.complete = events is not None
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[LoggedEvent]:
        return iter(self.events)

    def stop(self) -> None:
        """Stop making events (a log read from a file is complete already)."""


def file_log(path: Path, settings: Settings, description: str | None = None) -> EventLog:
    return EventLog(path, description or f"event log {path}", load_event_log(path, settings))


def movielens_log(path: Path, days: int, settings: Settings) -> EventLog:
    """MovieLens-100k with its ~215 days of ratings compressed into ``days``."""
    whole = movielens.load_events()
    stream = movielens.load_events(time_scale=(whole.last_ms - whole.first_ms) / (days * DAY_MS))
    movielens.write_events(path, stream)
    return file_log(path, settings, f"MovieLens-100k in {days} days")


def simulated_start_day(today: date, days: int) -> str:
    """The simulated days end at today's midnight (UTC): event times must lie
    in the past, as the streams worker dead-letters events ahead of the clock.

    >>> simulated_start_day(date(2026, 11, 23), 3)
    '2026-11-20'
    """
    return (today - timedelta(days=days)).isoformat()


def simulated_end_day(now: datetime) -> date:
    """The day whose midnight (UTC), where the simulated days end, lies at
    least two hours before ``now``: the worker's watermark follows the
    clock when idle but never passes it, so the last requests' windows (a
    join window past the log's end) close only once the clock is there. Run
    just after midnight, the log ends a day earlier.

    >>> simulated_end_day(datetime(2026, 11, 23, 0, 20, tzinfo=UTC)), simulated_end_day(datetime(2026, 11, 23, 9, tzinfo=UTC))
    (datetime.date(2026, 11, 22), datetime.date(2026, 11, 23))
    """
    return (now - timedelta(hours=2)).date()


class SimulatedLog(EventLog):
    """The simulator's days, made in a thread, handed over day by day."""

    def __init__(self, simulator: Simulator, days: int, path: Path, settings: Settings):
        super().__init__(path, f"{days} simulated days")
        self.simulator, self.days = simulator, days
        t = settings.topics
        self.topics = {"impressions": t.impressions, "clicks": t.clicks, "rank-logs": t.rank_logs}
        self._days: queue.Queue[list[LoggedEvent] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._make, name="simulator", daemon=True)

    def start(self) -> SimulatedLog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def __iter__(self) -> Iterator[LoggedEvent]:
        while True:
            try:
                day = self._days.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return  # stopped while a day was being made
                continue
            if day is None:
                return
            yield from day

    def _make(self) -> None:
        carried: list[LoggedEvent] = []  # a day's clicks after midnight, replayed with the next day
        try:
            with open(self.path, "wb") as handle:
                for day in range(self.days):
                    if self._stop.is_set():
                        return
                    made = []
                    for topic, event in self.simulator.events(day):
                        value = orjson.dumps(event)
                        handle.write(b'{"topic":"' + topic.encode() + b'","event":' + value + b"}\n")
                        made.append(LoggedEvent(event["ts"], self.topics[topic], event["user_id"].encode(), value))
                    made = sorted(carried + made, key=lambda e: e.ts)  # stable: equal times keep the simulator's order
                    if day + 1 < self.days:
                        next_day = self.simulator.day_start_ms(day + 1)
                        carried = [e for e in made if e.ts >= next_day]
                        made = [e for e in made if e.ts < next_day]
                    self.events.extend(made)
                    self._days.put(made)
            self.complete = True
        except Exception as error:  # noqa: BLE001 - a thread boundary: the supervisor reports it
            self.error = error
        finally:
            self._days.put(None)


def sample_request(events: list[LoggedEvent], settings: Settings) -> tuple[str, dict] | None:
    """A recall request for the user of the log's last click, with the
    features of their last impression (those the model knows)."""
    clicks, impressions = settings.topics.clicks, settings.topics.impressions
    user = next((e.key for e in reversed(events) if e.topic == clicks), None)
    if user is None:
        return None
    known = set(settings.model.user_categorical) | set(settings.model.user_numeric)
    features: dict = {}
    for e in reversed(events):
        if e.topic == impressions and e.key == user:
            given = orjson.loads(e.value).get("user_features") or {}
            for group in ("categorical", "numeric"):
                features.update({k: v for k, v in (given.get(group) or {}).items() if k in known})
            break
    return user.decode(), features


class ReplayThread(threading.Thread):
    """``streams.replay.replay_events`` over the event log, watched."""

    def __init__(self, settings: Settings, events: EventLog, speedup: float):
        super().__init__(name="replay", daemon=True)
        self.settings, self.log, self.speedup = settings, events, speedup
        self.sent = 0
        self.newest_event_ms: int | None = None
        self.counts: dict[str, int] | None = None
        self.error: Exception | None = None
        self.stop_requested = threading.Event()
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def _watched(self) -> Iterator[LoggedEvent]:
        for event in self.log:
            self.newest_event_ms = event.ts
            self.sent += 1
            yield event

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.counts = replay_events(
                self.settings, self._watched(), speedup=self.speedup or None, should_stop=self.stop_requested.is_set
            )
        except Exception as error:  # noqa: BLE001 - a thread boundary: the supervisor reports it as the part "replay"
            self.error = error
        finally:
            self.finished_at = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.finished_at is not None and self.error is None and not self.stop_requested.is_set() and self.log.complete

    @property
    def seconds(self) -> float:
        return 0.0 if self.started_at is None else (self.finished_at or time.monotonic()) - self.started_at
