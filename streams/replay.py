"""Replay a JSONL event log into the Kafka topics (``freshtower replay``).

The log holds one ``{"topic": "impressions" | "clicks" | "rank-logs",
"event": {...}}`` per line (what ``freshtower simulate --events`` writes).
Events are produced with kafka-python, keyed by ``user_id``, in event-time
order (a log out of order is sorted, stably, in memory) or, with
``file_order`` (``--file-order``), in the order of the file, disorder and
all, as a producer replaying a raw log would; either as fast as possible or
paced at ``speedup`` event-time seconds per wall second (paced by each
event's time relative to the first one's; an event behind that is sent at
once).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import NamedTuple

import orjson

from freshtower.core.settings import Settings


class ReplayError(RuntimeError):
    """The log cannot be replayed (bad line, or the broker refused events)."""


class LoggedEvent(NamedTuple):
    ts: int
    topic: str
    key: bytes
    value: bytes


def _topic_names(settings: Settings) -> dict[str, str]:
    """Names in the log -> topic names (the defaults and the configured ones)."""
    t = settings.topics
    return {
        "impressions": t.impressions,
        "clicks": t.clicks,
        "rank-logs": t.rank_logs,
        t.impressions: t.impressions,
        t.clicks: t.clicks,
        t.rank_logs: t.rank_logs,
    }


def load_event_log(path: Path | str, settings: Settings, *, file_order: bool = False) -> list[LoggedEvent]:
    """Every event of the log, in event-time order (``file_order``: as in the file)."""
    names = _topic_names(settings)
    events: list[LoggedEvent] = []
    in_order = True
    last_ts = None
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = orjson.loads(line)
                topic = names[record["topic"]]
                event = record["event"]
                user_id = event["user_id"]
                ts = event["ts"]
            except orjson.JSONDecodeError as error:
                raise ReplayError(f"{where}: not JSON ({error})") from None
            except (KeyError, TypeError) as error:
                raise ReplayError(
                    f"{where}: expected {{'topic': one of {sorted(set(names))}, 'event': {{..., 'user_id', 'ts'}}}}, missing {error}"
                ) from None
            if type(user_id) is not str or type(ts) is not int:
                raise ReplayError(f"{where}: user_id must be a string and ts integer milliseconds")
            if last_ts is not None and ts < last_ts:
                in_order = False
            last_ts = ts
            events.append(LoggedEvent(ts, topic, user_id.encode(), orjson.dumps(event)))
    if not in_order and not file_order:
        events.sort(key=lambda e: e.ts)  # stable: equal times keep the log's order
    return events


def replay(
    settings: Settings,
    path: Path | str,
    *,
    speedup: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    linger_ms: int = 20,
    batch_bytes: int = 256 * 1024,
    file_order: bool = False,
) -> dict[str, int]:
    """Produce the log; return counts per topic. ``speedup`` None: as fast
    as possible; else wait so that event time runs ``speedup`` times faster
    than the wall clock. ``file_order``: send the lines as they stand in the
    file, not sorted by event time."""
    events = load_event_log(path, settings, file_order=file_order)
    return replay_events(
        settings, events, speedup=speedup, progress=progress, should_stop=should_stop, linger_ms=linger_ms, batch_bytes=batch_bytes
    )


def replay_events(
    settings: Settings,
    events: Iterable[LoggedEvent],
    *,
    speedup: float | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    linger_ms: int = 20,
    batch_bytes: int = 256 * 1024,
) -> dict[str, int]:
    """Produce ``events`` (in event-time order, as ``load_event_log`` returns
    them; any iterable, so a log can be replayed while it is being made);
    return counts per topic. ``progress(sent, total)`` is called every 1000
    events and at the end (``total`` None for an iterable without a length);
    ``should_stop()`` ends the replay early (what was sent is flushed and
    counted)."""
    from freshtower.streams.topics import ensure_topics
    from kafka import KafkaProducer

    ensure_topics(settings)
    counts: Counter[str] = Counter()
    failures: list[Exception] = []
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        # Retried, not idempotent: after a broker restart the embedded
        # broker no longer knows the producer's sequence numbers and acked a
        # resent batch as a duplicate without storing it (8 of 3,988 clicks
        # lost in one run); a batch stored twice instead is harmless, the
        # worker counts an event_id once.
        enable_idempotence=False,
        retries=2**31 - 1,
        linger_ms=linger_ms,
        batch_size=batch_bytes,
        client_id="freshtower-replay",
    )
    sent = 0
    try:
        start_wall = time.monotonic()
        first_ts = None
        total = len(events) if isinstance(events, Sized) else None
        for n, event in enumerate(events):
            if first_ts is None:
                start_wall, first_ts = time.monotonic(), event.ts  # the pace starts with the first event
            if speedup:
                delay = start_wall + (event.ts - first_ts) / 1000 / speedup - time.monotonic()
                while delay > 0 and not should_stop():
                    time.sleep(min(delay, 0.2))  # in slices: a gap in a slow replay must not delay a stop
                    delay = start_wall + (event.ts - first_ts) / 1000 / speedup - time.monotonic()
            if (speedup or n % 256 == 0) and should_stop():
                break
            producer.send(event.topic, key=event.key, value=event.value).add_errback(failures.append)
            counts[event.topic] += 1
            sent = n + 1
            if progress is not None and n % 1000 == 0:
                progress(n, total)
        producer.flush()
        if progress is not None:
            progress(sent, total)
    finally:
        producer.close()
    if failures:
        raise ReplayError(f"{len(failures)} of {sent} events were not accepted by the broker; first error: {failures[0]!r}")
    return dict(counts)
