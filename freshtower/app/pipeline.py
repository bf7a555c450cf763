"""``freshtower run``: the whole pipeline on one machine, supervised.

On the embedded default it starts the local broker (Tansu on a free
loopback port) and each part as its own ``freshtower`` subcommand, the
same processes a deployment runs:

    streams        freshtower streams                 events -> batches
    train-daily    freshtower train daily             a full model at each event-time midnight
    train-online   freshtower train online --follow   user ID rows, batch by batch
    publish        freshtower publish                 full + embeddings releases (event clock)
    serve          freshtower serve                   the recall service

then replays an event log through Kafka (``freshtower/app/event_log.py``) at
``speedup`` event-time seconds per wall second, shows a live status line,
waits until every part has finished its share (``run_state.unfinished``),
prints a summary and stops everything. Ctrl-C / SIGTERM stops every part
and exits 130; a part that exits on its own is reported with its exit code
and log tail, the rest are stopped, and the run exits 1 (with
``restart_parts`` N > 0 it is first started again, up to N times a part). The starting,
watching and stopping is ``supervisor.Supervisor``'s; ``docs/run.md``
describes the parts, the completion rule and every wait.

Every child gets the same resolved settings through ``FRESHTOWER_*``
variables (``supervisor.child_environment``), with the run's choices on
top (``run_settings``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console
from rich.live import Live
from rich.text import Text

from freshtower.app import movielens, observation
from freshtower.app.event_log import (
    EventLog,
    ReplayThread,
    SimulatedLog,
    file_log,
    movielens_log,
    sample_request,
    simulated_end_day,
    simulated_start_day,
)
from freshtower.app.run_state import Observation, RunSummary, Settled, duration, progress, render_summary, status_line, unfinished
from freshtower.app.supervisor import Interrupted, PartDied, Stalled, Supervisor, child_environment, cli_command
from freshtower.core.settings import Settings
from freshtower.core.storage import atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_SPEEDUP = 1440.0  # event-time seconds per wall second: a simulated day in a minute


@dataclass(frozen=True)
class RunOptions:
    """What ``freshtower run`` replays and how fast (the CLI's options)."""

    days: int | None = None  # simulated days (None: 3); MovieLens: the days it is compressed into (None: 3); events: the first days
    users: int = 2000
    items: int = 1000
    requests_per_day: int = 20000
    seed: int = 0
    events: Path | None = None  # a JSONL log instead of the simulator
    movielens: bool = False  # MovieLens-100k, compressed into ``days`` days
    speedup: float = DEFAULT_SPEEDUP  # 0: as fast as possible
    start_timeout_seconds: float = 180.0  # every part up and answering
    settle_timeout_seconds: float = 300.0  # after the replay: every part done
    stop_timeout_seconds: float = 20.0  # SIGTERM, then SIGKILL


# --- pure pieces ------------------------------------------------------------------------


def unless_set(section: BaseModel, **defaults) -> BaseModel:
    """``section`` with ``defaults`` for the fields the user did not set
    (in the TOML file or the environment)."""
    chosen = {k: v for k, v in defaults.items() if k not in section.model_fields_set}
    return section.model_copy(update=chosen) if chosen else section


def run_settings(
    settings: Settings, *, bootstrap: str, streams_web_port: int, service_port: int, speedup: float, model: dict | None = None
) -> Settings:
    """The settings every part of the run gets: the user's, plus what a
    replay needs. Always: the broker, free ports, event-time clocks for the
    daily trainer and the publisher. Where the user did not set them,
    choices that fit an event-time day passing in a minute on two cores
    (each with its reason below)."""
    s = settings
    # Five-minute batches: at 1,440x a one-minute window lasts 42 ms of wall
    # time, and every stage pays ~10 ms a file (parse, fsync), so minute
    # files left the parts minutes behind the replay on two cores. The
    # allowed lateness covers half a wall second of delivery jitter (10
    # event-time seconds are 7 ms at 1,440x). Idle sources: the watermark
    # follows at the replay's pace, so the last windows close seconds after
    # the replay ends.
    streams = unless_set(
        s.streams,
        window_seconds=300.0,
        allowed_lateness_seconds=max(s.streams.allowed_lateness_seconds, 0.5 * speedup),
        # "Ahead of the stream": five wall seconds of one partition's stall (not 0.2 s at 1,440x), and at
        # least an hour, the quiet spells of a sparse partition at night (a replay as fast as possible
        # dead-lettered one click of 3,988 as future_timestamp at 300 s, in one run of several).
        max_future_seconds=max(s.streams.max_future_seconds, 5.0 * speedup, 3600.0),
        idle_seconds=2.0,
        idle_advance_rate=speedup or 3600.0,
    ).model_copy(update={"web_port": streams_web_port})
    # One torch thread per trainer: six processes share the cores, and torch's
    # pool waits for all its threads at every op (the full trainer ran 2-7x
    # slower with two threads here). Checkpoints every second: an event-time
    # hour passes in 2.5 s.
    training = unless_set(s.training, checkpoint_every_seconds=1.0, threads=1).model_copy(update={"full_clock": "event"})
    # Keep every release of the run: the summary scores the served states hour by hour.
    publisher = unless_set(s.publisher, poll_seconds=1.0, keep_releases=1000).model_copy(update={"clock": "event"})
    service = unless_set(s.service, poll_seconds=1.0).model_copy(update={"port": service_port})
    # The run's catalogues are small (1,000 simulated items, 1,682 movies):
    # 2^16 buckets keep the frequency snapshot written with every batch
    # (~13 ms at 2^20) and the online checkpoint small.
    frequency = unless_set(s.frequency, buckets=1 << 16)
    update = {
        "data_dir": s.data_dir.resolve(),
        "kafka": bootstrap,
        "frequency": frequency,
        "streams": streams,
        "training": training,
        "publisher": publisher,
        "service": service,
    }
    if model:
        update["model"] = s.model.model_copy(update=model)
    return s.model_copy(update=update)


def part_commands() -> dict[str, list[str]]:
    """Each part's command line, in start order; ``publish-final`` runs once
    at the end (see ``Pipeline._flush_publisher``)."""
    return {
        "streams": cli_command("streams"),
        "train-daily": cli_command("train", "daily", "--poll-seconds", "1"),
        "train-online": cli_command("train", "online", "--follow", "--poll-seconds", "0.5"),
        "publish": cli_command("publish"),
        "serve": cli_command("serve"),
        "publish-final": cli_command("publish", "--once", "--force"),
    }


# --- the supervisor -----------------------------------------------------------------------


class Pipeline:
    def __init__(self, settings: Settings, options: RunOptions, console: Console, out: Callable[[str], None] = print):
        self.user_settings = settings
        self.options = options
        self.console = console  # status and messages (stderr)
        self.out = out  # the summary (stdout)
        self.settings: Settings | None = None  # what the parts get (run_settings)
        self.events: EventLog | None = None
        self.replay: ReplayThread | None = None
        self.started = time.monotonic()
        self.logs_dir = settings.data_dir.resolve() / "logs"
        self.supervisor = Supervisor(
            self.logs_dir, stop_timeout_seconds=options.stop_timeout_seconds, catch_signals=True, restart_parts=settings.restart_parts
        )
        self.last_observation: Observation | None = None
        self.show: Callable[[str], None] = lambda text: None
        self._said: set[tuple[str, str]] = set()
        self._flushed = False
        self.env: dict[str, str] = {}

    # --- entry point -------------------------------------------------------------------

    def run(self) -> int:
        """Run to the summary; returns the exit code (0; 1 when a part died or
        did not finish; 130 after SIGINT / SIGTERM)."""
        from freshtower.core.batches import list_batches

        if list_batches(self.user_settings.batches_dir):
            self._say(
                f"{self.user_settings.batches_dir} already holds batches: point FRESHTOWER_DATA_DIR at a new "
                "directory (or remove it), so that this run's batches, models and releases are its own",
                "red",
            )
            return 1
        if self.options.events is not None:  # the log's features against the configured ones, before any part starts
            from freshtower.app.event_schema import SchemaMismatch, check_schema

            try:
                self._say(f"{self.options.events}: {check_schema(self.options.events, self.user_settings).describe()}")
            except SchemaMismatch as error:
                self._say(str(error), "red")
                return 2
        # kafka-python warns when a send waits on the GIL (the simulator thread
        # holds it for a moment); the replay reports real failures itself.
        logging.getLogger("kafka").setLevel(logging.ERROR)
        summary, failure = None, None
        with self.supervisor as supervisor:  # leaving it stops every part, then the broker
            supervisor.on_signal(self._on_signal)
            supervisor.watch_thread("simulator", lambda: self.events.error if self.events else None)
            supervisor.watch_thread("replay", lambda: self.replay.error if self.replay else None)
            try:
                summary = self._run()
            except (Interrupted, PartDied, Stalled) as error:
                failure = error
            finally:
                self._stop_replay()
        if failure is not None:
            self._report(failure, self.supervisor.ended)
            return 130 if isinstance(failure, Interrupted) else 1
        summary.quality = observation.quality_lines(self.settings, summary.last_event_ms)  # the parts are stopped: the cores are free
        summary.wall_seconds = time.monotonic() - self.started
        for line in render_summary(summary):
            self.out(line)
        return 0

    def _say(self, text: str, style: str | None = None) -> None:
        """A message on the console (stderr): plain text, never wrapped (paths stay whole in logs)."""
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def _on_signal(self, signum: int) -> None:
        if self.replay is not None:
            self.replay.stop_requested.set()
        if self.events is not None:
            self.events.stop()

    def _report(self, failure: Exception, ended: dict[str, str]) -> None:
        tail: list[str] = []
        where = None
        if isinstance(failure, Interrupted):
            name = signal.Signals(failure.signum).name
            self._say(f"interrupted by {name} after {duration(time.monotonic() - self.started)}", "yellow")
        elif isinstance(failure, PartDied):
            self._say(f"part {failure.name} died ({failure.how}); the other parts were stopped", "red")
            tail, where = failure.tail, failure.log_path
        else:
            self._say(str(failure), "red")
            child = self.supervisor.part(failure.part)
            if child is not None:
                tail, where = child.log_tail(), child.log_path
        if self.last_observation is not None:
            self._say(f"done so far: {status_line(self.last_observation)}")
        if ended:
            self._say("parts: " + ", ".join(f"{name} {how}" for name, how in ended.items()))
        if where is not None:
            self._say(f"last lines of {where}:")
        for line in tail:
            self._say(f"  {line}")

    # --- the run ---------------------------------------------------------------------

    def _run(self) -> RunSummary:
        from freshtower.core.ports import free_port

        o, supervisor = self.options, self.supervisor
        bootstrap = supervisor.bootstrap(self.user_settings.kafka, self.user_settings.durable_broker)
        settings = self.settings = run_settings(
            self.user_settings,
            bootstrap=bootstrap,
            streams_web_port=free_port(),
            service_port=free_port(),
            speedup=o.speedup,
            model=movielens.MODEL_FEATURES if o.movielens else None,
        )
        # The parts start (imports, consumer-group join) while the log is made.
        self.env = child_environment(settings, os.environ)
        for name, argv in part_commands().items():
            if name != "publish-final":
                supervisor.start(name, argv, self.env)
        self.worker_url = f"http://127.0.0.1:{settings.streams.web_port}"
        self.service_url = f"http://{settings.service.host}:{settings.service.port}"
        self._say(
            f"broker {bootstrap}{' (embedded)' if supervisor.broker else ''}; recall service {self.service_url}; "
            f"streams metrics {self.worker_url}/metrics; logs {self.logs_dir}"
        )
        self.events = self._open_log()
        self._write_run_file(bootstrap)
        supervisor.on_restart.append(lambda name: self._restarted(name, bootstrap))

        with self._live():
            self._watch(lambda obs: self._not_ready() is None, o.start_timeout_seconds, "the parts to start")
            self.replay = ReplayThread(settings, self.events, o.speedup)
            self.replay.start()
            self._watch(lambda obs: obs.replay_finished, None, "the replay")
            if not self.events.events:
                raise Stalled(f"{self.events.path} holds no events", "replay")
            self._say(f"replay done: {self.replay.sent:,} events in {duration(self.replay.seconds)}")
            settle_started = time.monotonic()
            last_ts = self.events.events[-1].ts
            self._watch(self._complete, o.settle_timeout_seconds, "every part to finish", settle_for=last_ts)
        self._say(f"every part is done, {duration(time.monotonic() - settle_started)} after the replay")
        return self._summary()

    def _complete(self, obs: Observation) -> bool:
        """Every part has finished; user rows that the publisher's event clock
        holds back (less than an interval of event time newer than the
        active release) are released by one final forced tick first: the
        log has ended, so that interval would never pass."""
        if unfinished(obs) is not None:
            return False
        if obs.settled.rows_pending and not self._flushed:
            self._flush_publisher(obs.settled.rows_pending)
        return not obs.settled.rows_pending

    def _flush_publisher(self, rows: int) -> None:
        self._flushed = True
        self.supervisor.stop("publish")  # it holds the store's publisher lock
        self.supervisor.run_once(
            "publish-final",
            part_commands()["publish-final"],
            self.env,
            self.options.settle_timeout_seconds,
            "the final `freshtower publish --once --force` ending",
        )
        self._say(
            f"published the last {rows:,} changed user rows with `freshtower publish --once --force` "
            f"(not due on the event clock, and the log has ended)"
        )

    def _open_log(self) -> EventLog:
        o, s = self.options, self.settings
        days = o.days or 3
        if o.events is not None:
            from freshtower.app.event_schema import first_days

            source = o.events
            if o.days is not None:  # the file's first days only
                source = s.data_dir / "events.jsonl"
                kept = first_days(o.events, source, o.days)
                self._say(f"the first {o.days} day(s) of {o.events}: {kept.events:,} events")
            events = file_log(source, s, f"event log {o.events}" + (f" (first {o.days} days)" if o.days else ""))
        elif o.movielens:
            events = movielens_log(s.data_dir / "events.jsonl", days, s)
        else:
            from freshtower.app.simulator import Simulator, SimulatorConfig

            o = replace(o, days=days)
            start_day = simulated_start_day(simulated_end_day(datetime.now(UTC)), o.days)
            config = SimulatorConfig(users=o.users, items=o.items, requests_per_day=o.requests_per_day, seed=o.seed, start_day=start_day)
            self._say(
                f"simulating {o.days} day{'s' if o.days != 1 else ''} from {start_day}: {o.users:,} users, {o.items:,} items, "
                f"{o.requests_per_day:,} requests a day, seed {o.seed}"
            )
            return SimulatedLog(Simulator(config), o.days, s.data_dir / "events.jsonl", s).start()
        self._say(f"{events.description}: {len(events.events):,} events")
        return events

    def _restarted(self, name: str, bootstrap: str) -> None:
        """A part died and was started again: say so, and put its new PID in ``run.json``."""
        count = self.supervisor.broker_restarts if name == "broker" else self.supervisor.restarts[name]
        self._say(f"part {name} died and was started again (restart {count})", "yellow")
        self._write_run_file(bootstrap)

    def _write_run_file(self, bootstrap: str) -> None:
        """``<data_dir>/run.json``: where everything of this run is (ports, PIDs, logs)."""
        parts = self.supervisor.processes()
        record = {
            "pid": os.getpid(),
            "events": str(self.events.path),
            "broker": bootstrap,
            "service": self.service_url,
            "streams_metrics": f"{self.worker_url}/metrics",
            "parts": parts,
        }
        # renamed into place: a reader polling it (a test, an operator's script)
        # never sees it half written while a restart rewrites it
        atomic_write_text(self.settings.data_dir / "run.json", json.dumps(record, indent=2))

    # --- watching ----------------------------------------------------------------------

    def _live(self):
        """A live status line on a terminal; elsewhere (CI logs, tests) a
        plain line every 15 s."""
        pipeline = self

        class Shown:
            def __enter__(self):
                if pipeline.console.is_terminal:
                    self.live = Live(Text(""), console=pipeline.console, refresh_per_second=2, transient=True)
                    self.live.__enter__()
                    pipeline.show = lambda text: self.live.update(Text(text))
                else:
                    self.live, last = None, [0.0]

                    def show(text: str) -> None:
                        if time.monotonic() - last[0] >= 15:
                            last[0] = time.monotonic()
                            pipeline._say(text)

                    pipeline.show = show

            def __exit__(self, *exc):
                if self.live is not None:
                    self.live.__exit__(*exc)
                pipeline.show = lambda text: None

        return Shown()

    def _watch(self, done: Callable[[Observation], bool], timeout: float | None, what: str, settle_for: int | None = None) -> None:
        """Observe twice a second until ``done``; a signal, a part that dies,
        or ``timeout`` seconds end the wait with an error naming the part
        (``Supervisor.wait``). ``settle_for``: the log's last event time, to
        observe the completion facts (once a second: they read every batch
        manifest)."""
        settled: Settled | None = None
        next_settled = 0.0
        waiting: tuple[str, str] | None = None

        def observed() -> bool:
            nonlocal settled, next_settled, waiting
            if settle_for is not None and time.monotonic() >= next_settled:
                settled = observation.settled(self.settings, settle_for, self.service_url)
                next_settled = time.monotonic() + 1.0
            obs = self.last_observation = self._observe(settled)
            self._announce(obs)
            waiting = unfinished(obs) if settle_for is not None else None
            self.show(status_line(obs) + (f" | waiting: {waiting[0]}" if waiting else ""))
            return done(obs)

        def blame() -> tuple[str, str]:
            return waiting or (self._not_ready() or "replay", "not answering")

        # Waiting for the parts to finish, the deadline is for a run that stopped moving, not a slow one.
        moving = (lambda: self.last_observation and progress(self.last_observation)) if settle_for is not None else None
        self.supervisor.wait(observed, timeout, what, blame, progress=moving)

    def _not_ready(self) -> str | None:
        """The first part that does not answer yet (None: all do)."""
        stats = observation.get_json(self.worker_url + "/stats")
        if not stats or not stats.get("ready"):
            return "streams"
        if observation.get_json(self.service_url + "/healthz") is None:  # 503 before the first release is an answer
            return "serve"
        return None

    def _announce(self, obs: Observation) -> None:
        """Say once when a full model lands and when a full release becomes active."""
        for version in obs.full_models:
            if ("model", version) not in self._said:
                self._said.add(("model", version))
                self._say(f"full model {version} trained")
        active = obs.active
        if active is not None and active.kind == "full" and ("release", active.version) not in self._said:
            self._said.add(("release", active.version))
            self._say(f"release {active.version} (model {active.model_version}) is active")

    def _observe(self, settled: Settled | None) -> Observation:
        r, events = self.replay, self.events
        released = observation.releases(self.settings)
        parts_alive, parts_total = self.supervisor.alive()
        return Observation(
            elapsed_seconds=time.monotonic() - self.started,
            events_sent=r.sent if r else 0,
            events_total=len(events.events) if events else 0,
            events_total_known=bool(events and events.complete),
            replay_finished=bool(r and r.finished),
            newest_event_ms=r.newest_event_ms if r else None,
            worker=observation.get_json(self.worker_url + "/stats"),
            full_models=observation.full_model_versions(self.settings),
            releases_full=released.full,
            releases_embeddings=released.embeddings,
            active=released.active,
            parts_alive=parts_alive,
            parts_total=parts_total,
            settled=settled,
            streams_restarts=self.supervisor.restarts.get("streams", 0),
        )

    # --- the end -----------------------------------------------------------------------

    def _summary(self) -> RunSummary:
        s, obs, events = self.settings, self.last_observation, self.events.events
        batches, per_day, records, positives = observation.batch_figures(s)
        request = sample_request(events, s)
        return RunSummary(
            source=self.events.description,
            wall_seconds=time.monotonic() - self.started,
            replay_seconds=self.replay.seconds,
            speedup=self.options.speedup,
            events_by_topic=self.replay.counts or {},
            last_event_ms=events[-1].ts,
            worker=obs.worker or {},
            batches=batches,
            batch_days=per_day,
            records=records,
            positives=positives,
            window_seconds=s.streams.window_seconds,
            full_models=observation.full_model_lines(s),
            online=observation.online_figures(s),
            releases_full=obs.releases_full,
            releases_embeddings=obs.releases_embeddings,
            active=obs.active,
            rows_not_due=obs.settled.rows_pending if obs.settled else 0,
            recall=None if request is None else observation.recall_sample(self.service_url, *request),
            prerank=[] if request is None else observation.prerank_lines(s, self.service_url, *request[:2]),
            logs_dir=str(self.logs_dir),
            restarts={**self.supervisor.restarts, **({"broker": self.supervisor.broker_restarts} if self.supervisor.broker_restarts else {})},
        )

    def _stop_replay(self) -> None:
        """Stop making and sending events (before the supervisor stops the parts)."""
        if self.events is not None:
            self.events.stop()
        if self.replay is not None:
            self.replay.stop_requested.set()
            self.replay.join(10)
