"""An event log turned into batch files the way production does it: the
events are produced to Kafka (``streams.replay``) and a real ``freshtower
streams`` worker joins them and cuts the batches.

``freshtower experiment`` uses this so that the arms it compares train on
what the streams path writes, not on a join done in Python beside it. The
worker runs under the supervisor (``supervisor.py``), which on the embedded
default also starts a local Tansu broker; with ``FRESHTOWER_KAFKA`` set the
broker is that cluster, and the topics and the
consumer group get names of their own (``exp-<id>-...``) so that nothing
else on it is read or disturbed.

The log is replayed as fast as the broker takes it; the batches are the
same as at any speed (event time drives the windows; the streams tests
check this against the simulator's own join). Once the log is read, the
worker's watermark follows an idle clock (``idle_advance_rate``) so the
last windows close in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from freshtower.app.observation import get_json
from freshtower.app.supervisor import Supervisor, child_environment, cli_command
from freshtower.core.settings import Settings


@dataclass
class StreamedBatches:
    events: dict[str, int]  # produced, per topic
    events_read: int
    records: int  # samples in the batch files
    batches: int
    dead_letters: int
    late_records: int
    join_hit_rate: float | None
    seconds: float  # wall time from the first event produced to the last window closed


def streams_settings(settings: Settings, bootstrap: str, data_dir: Path, web_port: int) -> Settings:
    """``settings`` for a worker of its own: topics and consumer group named
    for this run, the data directory, and an idle clock that closes the
    last windows at once (an event-time hour per idle wall second)."""
    prefix = f"exp-{uuid.uuid4().hex[:8]}"
    t = settings.topics
    topics = t.model_copy(
        update={
            name: f"{prefix}-{getattr(t, name)}"
            for name in ("impressions", "clicks", "rank_logs", "dead_letters", "training_batches", "user_embeddings")
        }
    )
    streams = settings.streams.model_copy(
        update={"app_id": f"{prefix}-streams", "idle_seconds": 2.0, "idle_advance_rate": 3600.0, "web_port": web_port}
    )
    return settings.model_copy(update={"kafka": bootstrap, "data_dir": data_dir.resolve(), "topics": topics, "streams": streams})


def last_event_ms(events_path: Path) -> int:
    """The newest event time in a replay-format JSONL log."""
    newest = None
    with open(events_path, "rb") as handle:
        for line in handle:
            if line.strip():
                ts = json.loads(line)["event"]["ts"]
                newest = ts if newest is None else max(newest, ts)
    if newest is None:
        raise ValueError(f"{events_path} holds no events")
    return int(newest)


def stream_to_batches(
    settings: Settings,
    events_path: Path,
    data_dir: Path,
    *,
    report: Callable[[str], None] = print,
    start_timeout_seconds: float = 180.0,
    finish_timeout_seconds: float = 1800.0,
) -> tuple[Settings, StreamedBatches]:
    """Replay ``events_path`` through Kafka into a streams worker; return
    the settings the batches were written with (their ``batches_dir``
    under ``data_dir``) and what the worker reported. The broker (when
    embedded) and the worker run under a ``Supervisor``: a worker that
    exits is a ``PartDied``, a wait that runs out a ``Stalled``, and both
    are stopped however this returns."""
    from freshtower.streams.replay import replay

    from freshtower.core.ports import free_port

    # kafka-python logs a refused connection while the broker starts and warns when a send waits
    # on the GIL; real failures surface as ReplayError, PartDied or Stalled
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    with Supervisor(data_dir / "logs", stop_timeout_seconds=20.0) as supervisor:
        worker_settings = streams_settings(settings, supervisor.bootstrap(settings.kafka, settings.durable_broker), data_dir, free_port())
        worker = supervisor.start("streams", cli_command("streams"), child_environment(worker_settings, os.environ))
        stats = _WorkerStats(f"http://127.0.0.1:{worker_settings.streams.web_port}/stats", worker.log_path)
        supervisor.wait(stats.once(lambda _: True), start_timeout_seconds, "the streams worker starting", stats.blame)
        started = time.monotonic()
        counts = replay(worker_settings, events_path)
        total = sum(counts.values())
        report(f"  {total:,} events produced to Kafka in {time.monotonic() - started:.0f} s; the worker is joining them")
        done_at = _last_window_closed_ms(worker_settings, events_path)
        joined = supervisor.wait(
            stats.once(lambda s: s["events_in"] >= total and (s.get("watermark_ms") or 0) >= done_at and s.get("open_requests", 0) == 0),
            finish_timeout_seconds,
            "the streams worker closing the last window",
            stats.blame,
        )
        seconds = time.monotonic() - started
    return worker_settings, _figures(worker_settings, counts, joined, seconds)


class _WorkerStats:
    """The worker's ``/stats``, polled by the supervisor's waits."""

    def __init__(self, url: str, log_path: Path):
        self.url, self.log_path = url, log_path
        self.last: dict | None = None

    def once(self, done: Callable[[dict], bool]) -> Callable[[], dict | None]:
        """A poll: the stats once the worker is ready and ``done(stats)``, else None."""

        def poll() -> dict | None:
            stats = self.last = get_json(self.url)
            return stats if stats is not None and stats.get("ready") and done(stats) else None

        return poll

    def blame(self) -> tuple[str, str]:
        return "streams", f"last stats {self.last} (log {self.log_path})"


def _last_window_closed_ms(settings: Settings, events_path: Path) -> int:
    """The watermark at which the worker has closed its last window: the last
    impression's shown-not-clicked samples wait out the join window, their
    window then closes after the allowed lateness."""
    st = settings.streams
    return last_event_ms(events_path) + int((st.join_window_seconds + st.window_seconds + st.allowed_lateness_seconds) * 1000)


def _figures(settings: Settings, counts: dict[str, int], stats: dict, seconds: float) -> StreamedBatches:
    from freshtower.core.batches import list_batches

    refs = list_batches(settings.batches_dir)
    return StreamedBatches(
        events=counts,
        events_read=int(stats["events_in"]),
        records=sum(r.manifest.records for r in refs),
        batches=len(refs),
        dead_letters=int(stats.get("dead_letters", 0)),
        late_records=int(stats.get("late_records", 0)),
        join_hit_rate=stats.get("join_hit_rate"),
        seconds=seconds,
    )


__all__ = ["StreamedBatches", "stream_to_batches", "streams_settings", "last_event_ms"]
