"""An event log turned into batch files the way production does it: the
events are produced to Kafka (``streams.replay``) and a real ``freshtower
streams`` worker joins them and cuts the batches.

``freshtower experiment`` uses this so that the arms it compares train on
what the streams path writes, not on a join done in Python beside it. On
the embedded default the broker is a local Tansu started here; with
``FRESHTOWER_KAFKA`` set it is that cluster, and the topics and the
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
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from freshtower.app.observation import get_json
from freshtower.app.pipeline import child_environment
from freshtower.app.processes import ChildProcess, exit_description, stop_all
from freshtower.core.settings import Settings


class StreamingFailed(RuntimeError):
    """The worker died or did not finish; the message says which and where its log is."""


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
    under ``data_dir``) and what the worker reported."""
    from freshtower.streams.broker import LocalBroker
    from freshtower.streams.replay import replay

    from freshtower.core.ports import free_port

    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # kafka-python logs a refused connection while the broker starts and warns when a send waits
    # on the GIL; real failures surface as ReplayError or StreamingFailed
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    broker = None
    bootstrap = settings.kafka
    if bootstrap is None:
        broker = LocalBroker(log_path=logs / "broker.log").start()
        bootstrap = broker.bootstrap
    worker_settings = streams_settings(settings, bootstrap, data_dir, free_port())
    worker = ChildProcess(
        "streams",
        [sys.executable, "-m", "freshtower.app.cli", "--log-level", "info", "streams"],
        child_environment(worker_settings, os.environ),
        logs / "streams.log",
    ).start()
    url = f"http://127.0.0.1:{worker_settings.streams.web_port}/stats"

    def wait_for(done: Callable[[dict], bool], timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if not worker.alive:
                tail = "\n  ".join(worker.log_tail())
                raise StreamingFailed(f"the streams worker stopped ({exit_description(worker.returncode)}); {worker.log_path}:\n  {tail}")
            stats = get_json(url)
            if stats is not None and stats.get("ready") and done(stats):
                return stats
            if time.monotonic() > deadline:
                raise StreamingFailed(f"{what} did not happen within {timeout:.0f} s (worker log: {worker.log_path}); last stats: {stats}")
            time.sleep(0.5)

    try:
        wait_for(lambda stats: True, start_timeout_seconds, "the streams worker starting")
        started = time.monotonic()
        counts = replay(worker_settings, events_path)
        total = sum(counts.values())
        st = worker_settings.streams
        # the last impression's shown-not-clicked samples wait out the join window; their window then closes after the lateness
        done_at = last_event_ms(events_path) + int((st.join_window_seconds + st.window_seconds + st.allowed_lateness_seconds) * 1000)
        report(f"  {total:,} events produced to Kafka in {time.monotonic() - started:.0f} s; the worker is joining them")
        stats = wait_for(
            lambda s: s["events_in"] >= total and (s.get("watermark_ms") or 0) >= done_at and s.get("open_requests", 0) == 0,
            finish_timeout_seconds,
            "the streams worker closing the last window",
        )
        seconds = time.monotonic() - started
    finally:
        stop_all([worker], 20.0)
        if broker is not None:
            broker.stop()
    from freshtower.core.batches import list_batches

    refs = list_batches(worker_settings.batches_dir)
    return worker_settings, StreamedBatches(
        events=counts,
        events_read=int(stats["events_in"]),
        records=sum(r.manifest.records for r in refs),
        batches=len(refs),
        dead_letters=int(stats.get("dead_letters", 0)),
        late_records=int(stats.get("late_records", 0)),
        join_hit_rate=stats.get("join_hit_rate"),
        seconds=seconds,
    )


__all__ = ["StreamedBatches", "StreamingFailed", "stream_to_batches", "streams_settings", "last_event_ms"]
