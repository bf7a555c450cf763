"""Live freshness on the wall clock: how long a click takes to reach a served
user row while the whole pipeline runs, and where the time goes.

    python benchmarks/bench_live_freshness.py --mode seconds --duration 90 --rate 200
    python benchmarks/bench_live_freshness.py --mode default,minute,seconds

For each mode, in a fresh data directory:

1. **History**: the simulator's yesterday (``--history-requests``) is
   written as batch files and ``freshtower train full`` trains the full
   model on it, as the daily trainer does after midnight.
2. **Pipeline**: the parts ``freshtower run`` starts, under its
   ``Supervisor``: the embedded broker, ``streams``, ``train online
   --follow``, ``publish`` and ``serve`` (the daily trainer is left out: no
   midnight passes during a run), on the wall clock, with the mode's
   settings. The live phase starts once the service serves the full release
   and every follower is up.
3. **Live traffic**: the same simulated world makes requests at ``--rate``
   per second (Poisson arrivals, event time = now); each event is produced
   to Kafka at its event time (rank log, impression, then the clicks ~20 s
   later), for ``--duration`` seconds. Then the pipeline is given
   ``--settle`` seconds (default: what the mode's waits add up to) to serve
   the last clicks.

Every click is traced on the wall clock through the announcements the
parts make (``freshtower/core/announcements.py``) and the service:

- **closed**: the ``training-batches`` announcement of the batch (window and
  partition) that holds the click;
- **trained**: the first ``online-checkpoints`` announcement whose
  checkpoint includes that batch (it names the batches it added);
- **released**: the first release announcement whose manifest holds that
  checkpoint step (``online_steps``);
- **served**: the first moment the service's ``/healthz`` answers that it
  serves that release or a later one (polled every ``--serve-poll``
  seconds).

At the end every clicked user's served row is read back
(``GET /v1/users/{id}/embedding``): a traced click counts as served only if
that row learnt it (its ``event_time_ms`` is at or after the click). The
report prints click -> served p50/p99/max and each hand-off, the
throughput sustained (events/s produced and read by the worker, the
worker's busy share) and the number of releases; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
from freshtower.streams.replay import LoggedEvent

from freshtower.app.event_log import EventLog, ReplayThread
from freshtower.app.observation import get_json
from freshtower.app.pipeline import part_commands
from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.app.supervisor import Supervisor, child_environment, cli_command
from freshtower.core.ports import free_port
from freshtower.core.settings import Settings, load_settings

# Each mode's settings on top of the defaults. "default" is the defaults
# (one-minute windows, an embeddings release every 30 minutes); "minute"
# publishes every minute; "seconds" cuts 2-second windows with 1 s of
# lateness and releases after each trained window (a checkpoint per window,
# the publisher woken by each one).
MODES: dict[str, dict[str, dict]] = {
    "default": {},
    "minute": {"publisher": {"publish_interval_seconds": 60.0}},
    "seconds": {
        "streams": {"window_seconds": 2.0, "allowed_lateness_seconds": 1.0, "idle_seconds": 1.0, "fetch_max_wait_ms": 100},
        "training": {"checkpoint_every_seconds": 0.0},
        "publisher": {"publish_interval_seconds": 0.001},
    },
}
STAGES = ("closed", "trained", "released", "served")
COLD = -2  # a user served the cold-start row: no row of their own yet (vocabulary.user_min_count)


# --- the traffic --------------------------------------------------------------------------


class LiveTraffic(EventLog):
    """The simulator's requests at ``rate`` per second from ``start_ms`` for
    ``seconds``, each event yielded at its event time (wall clock); the
    clicks yielded are recorded (user, event time, wall time sent)."""

    CHUNK_MS = 500

    def __init__(self, simulator: Simulator, day: int, settings: Settings, start_ms: int, seconds: float, rate: float):
        super().__init__(settings.data_dir / "live-events", f"live traffic, {rate:g} requests/s for {seconds:g} s")
        self.simulator, self.day, self.rate = simulator, day, rate
        self.start_ms, self.end_ms = start_ms, start_ms + int(seconds * 1000)
        t = settings.topics
        self.topics = {"impressions": t.impressions, "clicks": t.clicks, "rank-logs": t.rank_logs}
        self.complete = True  # for ReplayThread.finished: the iterator ends by itself
        self.clicks: list[tuple[str, int, float]] = []  # (user_id, event time ms, wall ms yielded)
        self.requests = 0
        self.lag_ms: list[float] = []  # wall time yielded minus event time, every event
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def __iter__(self) -> Iterator[LoggedEvent]:
        heap: list[tuple[int, int, str, dict]] = []
        sequence = 0
        t = self.start_ms
        while t < self.end_ms and not self._stop.is_set():
            # One chunk ahead: events before this chunk's first rank log (50 ms
            # before its first request) are final once it is made.
            chunk_end = min(t + self.CHUNK_MS, self.end_ms)
            made = self.simulator.live_requests(self.day, t, (chunk_end - t) / 1000, self.rate)
            self.requests += len(made)
            for topic, event in self.simulator.request_events(made):
                if event["ts"] < self.end_ms:  # clicks after the end are never made
                    heapq.heappush(heap, (event["ts"], sequence, topic, event))
                    sequence += 1
            yield from self._due(heap, t - 50)
            t = chunk_end
        yield from self._due(heap, None)

    def _due(self, heap: list, before_ms: int | None) -> Iterator[LoggedEvent]:
        while heap and (before_ms is None or heap[0][0] < before_ms) and not self._stop.is_set():
            ts, _, topic, event = heapq.heappop(heap)
            while (wait := ts / 1000 - time.time()) > 0 and not self._stop.is_set():
                time.sleep(min(wait, 0.2))
            now_ms = time.time() * 1000
            self.lag_ms.append(now_ms - ts)
            if topic == "clicks":
                self.clicks.append((event["user_id"], ts, now_ms))
            yield LoggedEvent(ts, self.topics[topic], event["user_id"].encode(), orjson.dumps(event))


# --- following the hand-offs ----------------------------------------------------------------


@dataclass
class Handoffs:
    """What the announcement topics and the service said, with wall times (ms)."""

    batches: dict[tuple[int, int], tuple[float, str]] = field(default_factory=dict)  # (partition, window start) -> (closed, key)
    window_ms: int = 60_000
    checkpoints: list[tuple[float, int, list[str]]] = field(default_factory=list)  # (announced, step, batches it added)
    releases: list[tuple[float, str, str, int]] = field(default_factory=list)  # (announced, version, kind, online step held)
    served: list[tuple[float, str]] = field(default_factory=list)  # (first seen, version) as /healthz names them


class Follower(threading.Thread):
    """Reads the three announcement topics from their start (no group) and
    the release manifests they name."""

    def __init__(self, settings: Settings, handoffs: Handoffs):
        super().__init__(name="follower", daemon=True)
        self.settings, self.handoffs = settings, handoffs
        self.stopping = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from freshtower.publisher.release_store import open_release_store

        t = self.settings.topics
        store = open_release_store(self.settings)
        try:
            consumer = KafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                     fetch_max_wait_ms=20, client_id="live-freshness")
            parts = [TopicPartition(topic, 0) for topic in (t.training_batches, t.online_checkpoints, t.releases)]
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            while not self.stopping.is_set():
                for tp, records in consumer.poll(timeout_ms=100).items():
                    for record in records:
                        self._take(tp.topic, json.loads(record.value), record.timestamp, store)
            consumer.close()
        except Exception as error:  # noqa: BLE001 - a thread boundary: the supervisor reports it
            self.error = error

    def _take(self, topic: str, record: dict, timestamp_ms: float, store) -> None:
        t, h = self.settings.topics, self.handoffs
        at = record.get("announced_at", timestamp_ms / 1000) * 1000
        if topic == t.training_batches:
            key = record["manifest"].removesuffix(".json")
            h.batches.setdefault((int(record.get("partition", 0)), int(record["window_start_ms"])), (at, key))
        elif topic == t.online_checkpoints:
            h.checkpoints.append((at, int(record["step"]), list(record.get("batches") or [])))
        elif topic == t.releases:
            manifest = store.get(record["version"]).manifest
            h.releases.append((at, record["version"], record["kind"], max(manifest.online_steps.values(), default=0)))


class ServePoller(threading.Thread):
    """Asks the service's ``/healthz`` every ``period`` seconds which release it serves; records each change."""

    def __init__(self, host: str, port: int, handoffs: Handoffs, period: float):
        super().__init__(name="serve-poller", daemon=True)
        self.host, self.port, self.handoffs, self.period = host, port, handoffs, period
        self.stopping = threading.Event()
        self.error: Exception | None = None
        self.polls = 0

    def run(self) -> None:
        connection = None
        last = None
        while not self.stopping.is_set():
            try:
                connection = connection or http.client.HTTPConnection(self.host, self.port, timeout=2)
                connection.request("GET", "/healthz")
                body = json.loads(connection.getresponse().read())
                self.polls += 1
                serving = body.get("serving")
                if serving and serving != last:
                    self.handoffs.served.append((time.time() * 1000, serving))
                    last = serving
            except (OSError, ValueError, http.client.HTTPException):
                connection = None
            self.stopping.wait(self.period)


# --- tracing (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    user_id: str
    click_ms: int  # event time = the wall time it was made for
    sent_ms: float
    closed_ms: float | None = None
    trained_ms: float | None = None
    released_ms: float | None = None
    served_ms: float | None = None


def partition_of(user_id: str, partitions: int) -> int:
    """The partition kafka-python's default partitioner gives the key (murmur2, as the worker checks)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def trace_clicks(clicks: list[tuple[str, int, float]], h: Handoffs, partitions: int) -> list[Trace]:
    """Each click's wall time at each hand-off (None where it never got there)."""
    trained_at: dict[str, tuple[float, int]] = {}
    for at, step, keys in h.checkpoints:
        for key in keys:
            trained_at.setdefault(key, (at, step))
    releases = sorted(h.releases)
    served = sorted(h.served)
    traces = []
    for user, ts, sent in clicks:
        window = ts - ts % h.window_ms
        closed = h.batches.get((partition_of(user, partitions), window))
        trace = Trace(user, ts, sent)
        if closed is not None:
            trace = Trace(user, ts, sent, closed[0])
            trained = trained_at.get(closed[1])
            if trained is not None:
                released = next(((at, v) for at, v, _, step in releases if step >= trained[1] and at >= trained[0]), None)
                served_at = None
                if released is not None:
                    served_at = next((at for at, v in served if v >= released[1] and at >= released[0]), None)
                trace = Trace(user, ts, sent, closed[0], trained[0], released and released[0], served_at)
        traces.append(trace)
    return traces


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"n": len(a), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def due_ms(click_ms: int, window_ms: int, lateness_ms: float) -> float:
    """When the settings let the click's window close: its end plus the allowed lateness.

    >>> due_ms(7_300, 2_000, 1_000)  # window [6 s, 8 s) closes at 9 s
    9000
    """
    return click_ms - click_ms % window_ms + window_ms + lateness_ms


def split(traces: list[Trace], window_ms: int = 60_000, lateness_ms: float = 0.0) -> dict[str, dict | None]:
    """Seconds per hand-off (over the clicks that got past it) and end to end
    (served clicks). "click -> closed" is split in two: the wait the settings
    impose (to the window's end plus the allowed lateness) and the worker's
    delay after it."""
    s = lambda a, b: (b - a) / 1000  # noqa: E731
    served = [t for t in traces if t.served_ms is not None]
    closed = [t for t in traces if t.closed_ms is not None]
    return {
        "click -> served": percentiles([s(t.click_ms, t.served_ms) for t in served]),
        "click -> closed": percentiles([s(t.click_ms, t.closed_ms) for t in closed]),
        "  click -> window due": percentiles([s(t.click_ms, due_ms(t.click_ms, window_ms, lateness_ms)) for t in closed]),
        "  window due -> closed": percentiles([s(due_ms(t.click_ms, window_ms, lateness_ms), t.closed_ms) for t in closed]),
        "closed -> trained": percentiles([s(t.closed_ms, t.trained_ms) for t in traces if t.trained_ms is not None]),
        "trained -> released": percentiles([s(t.trained_ms, t.released_ms) for t in traces if t.released_ms is not None]),
        "released -> served": percentiles([s(t.released_ms, t.served_ms) for t in served]),
        "trained -> served": percentiles([s(t.trained_ms, t.served_ms) for t in served]),
    }


def monotone(trace: Trace) -> bool:
    """The stages reached are a prefix of the chain (none skipped), each at or after the one before (the click first)."""
    times = [trace.click_ms, *(getattr(trace, f"{s}_ms") for s in STAGES)]
    reached = list(itertools.takewhile(lambda x: x is not None, times))
    return all(x is None for x in times[len(reached):]) and all(a <= b for a, b in zip(reached, reached[1:]))


# --- one mode -----------------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: str
    settings: dict
    duration_s: float
    rate: float
    requests: int
    events_sent: int
    clicks: int
    reached: dict[str, int]
    verified: int  # served clicks whose user's served row learnt them
    not_learnt: int  # clicks whose user's served row has not learnt them at the end
    cold_start: int  # clicks of users who still have no row of their own (served the cold-start row)
    served_not_learnt: int  # traced to a served release, yet the user's own served row has not learnt them (a tracing error)
    split: dict
    close_delay: dict | None  # per batch: seconds from its window's end + the allowed lateness to its announcement
    events_per_second_sent: float
    events_per_second_read: float
    worker_busy_share: float | None
    batches: int
    checkpoints: int
    releases: int
    generator_lag_p99_ms: float
    non_monotone: int
    setup_s: float


def mode_settings(mode: str, data_dir: Path, bootstrap: str, overrides: dict) -> Settings:
    sections: dict[str, dict] = {k: dict(v) for k, v in MODES[mode].items()}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    # As in `freshtower run`: one torch thread per trainer (the parts share the
    # cores), small frequency arrays for a small catalogue, every release kept.
    sections.setdefault("training", {}).setdefault("threads", 1)
    sections.setdefault("frequency", {}).setdefault("buckets", 1 << 16)
    sections.setdefault("publisher", {}).setdefault("keep_releases", 1000)
    sections.setdefault("streams", {})["web_port"] = free_port()
    sections.setdefault("service", {})["port"] = free_port()
    return load_settings(data_dir=data_dir.resolve(), kafka=bootstrap, **sections)


def wait_for(what: str, done, timeout: float, supervisor: Supervisor) -> None:
    supervisor.wait(done, timeout, what, lambda: (what, "not yet"))


def log_says(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except OSError:
        return False


def run_mode(mode: str, args, root: Path, overrides: dict, say=print) -> ModeResult:
    started = time.monotonic()
    data_dir = root / mode
    shutil.rmtree(data_dir, ignore_errors=True)
    logs = data_dir / "logs"
    with Supervisor(logs, stop_timeout_seconds=10) as supervisor:
        bootstrap = supervisor.bootstrap(None)
        settings = mode_settings(mode, data_dir, bootstrap, overrides)
        env = child_environment(settings, os.environ)
        today = datetime.now(UTC).date()
        world = SimulatorConfig(users=args.users, items=args.items, requests_per_day=args.history_requests, seed=args.seed,
                                start_day=(today - timedelta(days=1)).isoformat())
        simulator = Simulator(world)
        simulator.write_batches(settings.batches_dir, 0, window_seconds=300.0)
        _create_announcement_topics(settings)
        commands = part_commands()
        for name in ("streams", "train-online", "publish", "serve"):
            supervisor.start(name, commands[name], env)
        supervisor.run_once("train-full", cli_command("train", "full", "--day", world.start_day), env, 600, "the full model of yesterday")
        service = f"http://{settings.service.host}:{settings.service.port}"
        worker = f"http://127.0.0.1:{settings.streams.web_port}"
        wait_for("the service serving the full release", lambda: (get_json(service + "/healthz") or {}).get("status") == "ok", 300,
                 supervisor)
        wait_for("the streams worker ready", lambda: (get_json(worker + "/stats") or {}).get("ready"), 120, supervisor)
        for part, topic in (("train-online", settings.topics.training_batches), ("publish", settings.topics.online_checkpoints),
                            ("serve", settings.topics.releases)):
            wait_for(f"{part} following {topic}", lambda p=part, t=topic: log_says(logs / f"{p}.log", f"following announcements on {t}"),
                     60, supervisor)
        setup_s = time.monotonic() - started
        say(f"[{mode}] pipeline up in {setup_s:.0f} s; live traffic for {args.duration:g} s at {args.rate:g} requests/s")

        handoffs = Handoffs(window_ms=int(settings.streams.window_seconds * 1000))
        follower = Follower(settings, handoffs)
        poller = ServePoller(settings.service.host, settings.service.port, handoffs, args.serve_poll)
        follower.start()
        poller.start()
        supervisor.watch_thread("follower", lambda: follower.error)
        before = get_json(worker + "/stats") or {}
        traffic = LiveTraffic(simulator, 1, settings, int(time.time() * 1000) + 1000, args.duration, args.rate)
        replay = ReplayThread(settings, traffic, 0)
        supervisor.watch_thread("traffic", lambda: replay.error)
        replay.start()
        live_started = time.monotonic()
        try:
            wait_for("the live traffic", lambda: not replay.is_alive(), args.duration + 120, supervisor)
            live_seconds = time.monotonic() - live_started
            after = get_json(worker + "/stats") or {}
            settle = args.settle if args.settle is not None else default_settle(settings)
            say(f"[{mode}] traffic done ({replay.sent:,} events); up to {settle:.0f} s for the last clicks to be served")
            end = time.monotonic() + settle
            wait_for("the last clicks", lambda: time.monotonic() > end or _all_through(traffic, handoffs, settings), settle + 30,
                     supervisor)
            traces = trace_clicks(traffic.clicks, handoffs, settings.streams.partitions)
            learnt = _rows_learnt(service, traffic.clicks)
        finally:
            traffic.stop()
            replay.stop_requested.set()
            follower.stopping.set()
            poller.stopping.set()
            replay.join(10)
    # A click counts as served only if its user's served row has learnt it.
    learnt_it = [learnt.get(t.user_id, -1) >= t.click_ms for t in traces]
    counted = [t if ok else replace(t, served_ms=None) for t, ok in zip(traces, learnt_it)]
    verified = sum(1 for t in counted if t.served_ms is not None)
    not_learnt = learnt_it.count(False)
    cold = sum(1 for t in traces if learnt.get(t.user_id) == COLD)
    served_not_learnt = sum(1 for t, ok in zip(traces, learnt_it) if t.served_ms is not None and not ok and learnt.get(t.user_id) != COLD)
    lateness_ms = settings.streams.allowed_lateness_seconds * 1000
    close_delays = [(at - start - handoffs.window_ms - lateness_ms) / 1000 for (_, start), (at, _) in handoffs.batches.items()
                    if start >= traffic.start_ms - handoffs.window_ms]
    busy = None
    if before.get("busy_seconds") is not None and after.get("busy_seconds") is not None:
        busy = (after["busy_seconds"] - before["busy_seconds"]) / live_seconds
    return ModeResult(
        mode=mode,
        settings={"window_seconds": settings.streams.window_seconds, "allowed_lateness_seconds": settings.streams.allowed_lateness_seconds,
                  "idle_seconds": settings.streams.idle_seconds, "checkpoint_every_seconds": settings.training.checkpoint_every_seconds,
                  "publish_interval_seconds": settings.publisher.publish_interval_seconds,
                  "fetch_wait_ms": settings.announcements.fetch_wait_ms,
                  "input_fetch_max_wait_ms": settings.streams.fetch_max_wait_ms},
        duration_s=args.duration,
        rate=args.rate,
        requests=traffic.requests,
        events_sent=replay.sent,
        clicks=len(traces),
        reached={s: sum(1 for t in counted if getattr(t, f"{s}_ms") is not None) for s in STAGES},
        verified=verified,
        not_learnt=not_learnt,
        cold_start=cold,
        served_not_learnt=served_not_learnt,
        split=split(counted, handoffs.window_ms, lateness_ms),
        close_delay=percentiles(close_delays),
        events_per_second_sent=replay.sent / live_seconds,
        events_per_second_read=(after.get("events_in", 0) - before.get("events_in", 0)) / live_seconds,
        worker_busy_share=busy,
        batches=len(handoffs.batches),
        checkpoints=len(handoffs.checkpoints),
        releases=sum(1 for r in handoffs.releases if r[2] != "full"),
        generator_lag_p99_ms=float(np.percentile(traffic.lag_ms, 99)) if traffic.lag_ms else 0.0,
        non_monotone=sum(1 for t in counted if not monotone(t)),
        setup_s=setup_s,
    )


def release_in_time(settings: Settings) -> bool:
    """Can an embeddings release come within a short run? Not at a 30-minute interval."""
    return settings.publisher.publish_interval_seconds <= 120.0


def default_settle(settings: Settings) -> float:
    """Long enough for the last click's window to close (idle clock), be
    trained and, when the interval allows it, released."""
    s = settings.streams
    publish = settings.publisher.publish_interval_seconds if release_in_time(settings) else 0.0
    return s.window_seconds + s.allowed_lateness_seconds + s.idle_seconds + publish + 15.0


def _all_through(traffic: LiveTraffic, handoffs: Handoffs, settings: Settings) -> bool:
    """The last click is served (trained, when no release can come in time)."""
    if not traffic.clicks:
        return False
    trace = trace_clicks(traffic.clicks[-1:], handoffs, settings.streams.partitions)[0]
    return (trace.served_ms if release_in_time(settings) else trace.trained_ms) is not None


def _rows_learnt(service: str, clicks: list[tuple[str, int, float]]) -> dict[str, int]:
    """Each clicked user's served row: the newest click it learnt from (-1: none, ``COLD``: no row, the cold-start row served)."""
    learnt = {}
    for user in sorted({u for u, _, _ in clicks}):
        body = get_json(f"{service}/v1/users/{user}/embedding", timeout=5) or {}
        learnt[user] = COLD if body.get("cold_start") else body.get("event_time_ms") or -1
    return learnt


def _create_announcement_topics(settings: Settings) -> None:
    """The streams topics, and the announcement topics the parts would create on their first announcement, up front."""
    from freshtower.streams.topics import ensure_topics
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    ensure_topics(settings)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, client_id="live-freshness")
    try:
        existing = set(admin.list_topics())
        wanted = [settings.topics.online_checkpoints, settings.topics.releases]
        admin.create_topics([NewTopic(name, 1, 1) for name in wanted if name not in existing])
    finally:
        admin.close()


# --- the report -----------------------------------------------------------------------------------


def render(result: ModeResult) -> list[str]:
    r, c = result, result.settings
    lines = [
        f"== mode {r.mode}: {c['window_seconds']:g} s windows, {c['allowed_lateness_seconds']:g} s lateness, "
        f"checkpoint every {c['checkpoint_every_seconds']:g} s, embeddings release every {c['publish_interval_seconds']:g} s, "
        f"input fetch wait {c['input_fetch_max_wait_ms']} ms, idle clock {c['idle_seconds']:g} s",
        f"traffic: {r.requests:,} requests in {r.duration_s:g} s ({r.requests / r.duration_s:,.0f}/s), {r.events_sent:,} events "
        f"({r.events_per_second_sent:,.0f}/s sent, {r.events_per_second_read:,.0f}/s read by the worker"
        + (f", worker busy {r.worker_busy_share:.0%} of the wall time" if r.worker_busy_share is not None else "")
        + f"), generator lag p99 {r.generator_lag_p99_ms:.0f} ms",
        f"hand-offs: {r.batches} batches closed, {r.checkpoints} checkpoints, {r.releases} embeddings releases",
        f"clicks: {r.clicks:,}; reached closed {r.reached['closed']:,}, trained {r.reached['trained']:,}, "
        f"released {r.reached['released']:,}, served {r.reached['served']:,} (each checked against the served row: "
        f"{r.verified:,} learnt, {r.served_not_learnt:,} traced but not learnt; {r.not_learnt:,} not in their user's served row "
        f"at the end, {r.cold_start:,} of them of users with no row yet); "
        f"{r.non_monotone} out of stage order",
        f"{'stage (seconds)':<22}{'clicks':>8}{'p50':>9}{'p99':>9}{'max':>9}",
    ]
    for name, figures in r.split.items():
        if figures is None:
            lines.append(f"{name:<22}{0:>8}{'-':>9}{'-':>9}{'-':>9}")
        else:
            lines.append(f"{name:<22}{figures['n']:>8,}{figures['p50']:>9.2f}{figures['p99']:>9.2f}{figures['max']:>9.2f}")
    if r.close_delay is not None:
        d = r.close_delay
        lines.append(f"{'window end + lateness':<22}{d['n']:>8,}{d['p50']:>9.2f}{d['p99']:>9.2f}{d['max']:>9.2f}   "
                     "-> batch announced (per batch)")
    return lines


def parse_overrides(items: list[str]) -> dict:
    """``section.field=value`` (JSON values, else strings) -> nested dicts."""
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not name or not value:
            raise SystemExit(f"--set {item!r}: expected section.field=value, e.g. streams.window_seconds=2")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(section, {})[name] = parsed
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="default,seconds", help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of live traffic per mode")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (each with its impression, rank log, clicks)")
    parser.add_argument("--settle", type=float, default=None, help="seconds after the traffic for the last clicks (default: per mode)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--history-requests", type=int, default=20000, help="requests of the simulated day the full model learns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-poll", type=float, default=0.02, help="how often the service's /healthz is asked what it serves")
    parser.add_argument("--set", action="append", default=[], help="a setting on top of the mode's, e.g. streams.window_seconds=2")
    parser.add_argument("--data-dir", type=Path, default=None, help="where each mode's data goes (default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    overrides = parse_overrides(args.set)
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="live-freshness-"))
    results = []
    try:
        for mode in modes:
            result = run_mode(mode, args, root, overrides, say=lambda text: print(text, file=sys.stderr, flush=True))
            results.append(result)
            for line in render(result):
                print(line, flush=True)
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
