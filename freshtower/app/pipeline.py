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
and log tail, the rest are stopped, and the run exits 1.

Every child gets the same resolved settings through ``FRESHTOWER_*``
variables (``child_environment``), with the run's choices on top
(``run_settings``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from freshtower.streams.replay import LoggedEvent, replay_events
from pydantic import BaseModel
from rich.console import Console
from rich.live import Live
from rich.text import Text

from freshtower.app import observation
from freshtower.app.event_log import MOVIELENS_MODEL, EventLog, SimulatedLog, file_log, movielens_log, sample_request, simulated_start_day
from freshtower.app.processes import ChildProcess, exit_description, stop_all
from freshtower.app.run_state import Observation, RunSummary, Settled, duration, render_summary, status_line, unfinished
from freshtower.core.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_SPEEDUP = 1440.0  # event-time seconds per wall second: a simulated day in a minute


@dataclass(frozen=True)
class RunOptions:
    """What ``freshtower run`` replays and how fast (the CLI's options)."""

    days: int = 3
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


class PartDied(RuntimeError):
    def __init__(self, name: str, how: str, log_path: Path | None, tail: list[str]):
        super().__init__(f"part {name} stopped on its own ({how})")
        self.name, self.how, self.log_path, self.tail = name, how, log_path, tail


class Stalled(RuntimeError):
    """A wait ran out of time; ``part`` is the one that did not finish."""

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part


class Interrupted(RuntimeError):
    pass


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


def child_environment(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """The environment that gives a child exactly ``settings``: the parent's
    ``FRESHTOWER_*`` variables are replaced by one variable per top-level
    setting (sections as JSON)."""
    env = {k: v for k, v in base.items() if not k.startswith("FRESHTOWER_")}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"FRESHTOWER_{name.upper()}"] = value.model_dump_json() if isinstance(value, BaseModel) else str(value)
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file at once, so a dead part's tail is complete
    return env


def part_commands(python: str = sys.executable) -> dict[str, list[str]]:
    """Each part's command line, in start order; ``publish-final`` runs once
    at the end (see ``Pipeline._flush_publisher``)."""
    cli = [python, "-m", "freshtower.app.cli", "--log-level", "info"]
    return {
        "streams": [*cli, "streams"],
        "train-daily": [*cli, "train", "daily", "--poll-seconds", "1"],
        "train-online": [*cli, "train", "online", "--follow", "--poll-seconds", "0.5"],
        "publish": [*cli, "publish"],
        "serve": [*cli, "serve"],
        "publish-final": [*cli, "publish", "--once", "--force"],
    }


# --- the replay, in a thread -------------------------------------------------------------


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


# --- the supervisor -----------------------------------------------------------------------


class Pipeline:
    def __init__(self, settings: Settings, options: RunOptions, console: Console, out: Callable[[str], None] = print):
        self.user_settings = settings
        self.options = options
        self.console = console  # status and messages (stderr)
        self.out = out  # the summary (stdout)
        self.settings: Settings | None = None  # what the parts get (run_settings)
        self.children: list[ChildProcess] = []
        self.broker = None
        self.events: EventLog | None = None
        self.replay: ReplayThread | None = None
        self.signal_received: int | None = None
        self.started = time.monotonic()
        self.logs_dir = settings.data_dir.resolve() / "logs"
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
        # kafka-python warns when a send waits on the GIL (the simulator thread
        # holds it for a moment); the replay reports real failures itself.
        logging.getLogger("kafka").setLevel(logging.ERROR)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        summary, failure = None, None
        try:
            summary = self._run()
        except (Interrupted, PartDied, Stalled) as error:
            failure = error
        finally:
            ended = self._stop_everything()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if failure is not None:
            self._report(failure, ended)
            return 130 if isinstance(failure, Interrupted) else 1
        summary.quality = observation.quality_lines(self.settings, summary.last_event_ms)  # the parts are stopped: the cores are free
        summary.wall_seconds = time.monotonic() - self.started
        for line in render_summary(summary):
            self.out(line)
        return 0

    def _say(self, text: str, style: str | None = None) -> None:
        """A message on the console (stderr): plain text, never wrapped (paths stay whole in logs)."""
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def _on_signal(self, signum, frame) -> None:
        if self.signal_received is None:
            self.signal_received = signum
        if self.replay is not None:
            self.replay.stop_requested.set()
        if self.events is not None:
            self.events.stop()

    def _check_signal(self) -> None:
        if self.signal_received is not None:
            raise Interrupted()

    def _report(self, failure: Exception, ended: dict[str, str]) -> None:
        tail: list[str] = []
        where = None
        if isinstance(failure, Interrupted):
            name = signal.Signals(self.signal_received).name
            self._say(f"interrupted by {name} after {duration(time.monotonic() - self.started)}", "yellow")
        elif isinstance(failure, PartDied):
            self._say(f"part {failure.name} died ({failure.how}); the other parts were stopped", "red")
            tail, where = failure.tail, failure.log_path
        else:
            self._say(str(failure), "red")
            child = next((c for c in self.children if c.name == failure.part), None)
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
        from freshtower.streams.broker import LocalBroker

        from freshtower.core.ports import free_port

        o = self.options
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        bootstrap = self.user_settings.kafka
        if bootstrap is None:
            self.broker = LocalBroker(log_path=self.logs_dir / "broker.log").start()
            bootstrap = self.broker.bootstrap
        settings = self.settings = run_settings(
            self.user_settings,
            bootstrap=bootstrap,
            streams_web_port=free_port(),
            service_port=free_port(),
            speedup=o.speedup,
            model=MOVIELENS_MODEL if o.movielens else None,
        )
        # The parts start (imports, consumer-group join) while the log is made.
        self.env = child_environment(settings, os.environ)
        for name, argv in part_commands().items():
            if name != "publish-final":
                self.children.append(ChildProcess(name, argv, self.env, self.logs_dir / f"{name}.log").start())
        self.worker_url = f"http://127.0.0.1:{settings.streams.web_port}"
        self.service_url = f"http://{settings.service.host}:{settings.service.port}"
        self._say(
            f"broker {bootstrap}{' (embedded)' if self.broker else ''}; recall service {self.service_url}; "
            f"streams metrics {self.worker_url}/metrics; logs {self.logs_dir}"
        )
        self.events = self._open_log()
        self._write_run_file(bootstrap)

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
        publisher = next(c for c in self.children if c.name == "publish")
        stop_all([publisher], self.options.stop_timeout_seconds)  # it holds the store's publisher lock
        final = ChildProcess("publish-final", part_commands()["publish-final"], self.env, self.logs_dir / "publish-final.log").start()
        deadline = time.monotonic() + self.options.settle_timeout_seconds
        while final.alive:
            self._check_signal()
            if time.monotonic() > deadline:
                stop_all([final], self.options.stop_timeout_seconds)
                raise Stalled(
                    f"the final `freshtower publish --once --force` did not end within {self.options.settle_timeout_seconds:.0f} s",
                    "publish",
                )
            time.sleep(0.2)
        if final.returncode != 0:
            raise PartDied("publish-final", exit_description(final.returncode), final.log_path, final.log_tail())
        self._say(
            f"published the last {rows:,} changed user rows with `freshtower publish --once --force` "
            f"(not due on the event clock, and the log has ended)"
        )

    def _open_log(self) -> EventLog:
        o, s = self.options, self.settings
        if o.events is not None:
            events = file_log(o.events, s)
        elif o.movielens:
            events = movielens_log(s.data_dir / "events.jsonl", o.days, s)
        else:
            from freshtower.app.simulator import Simulator, SimulatorConfig

            start_day = simulated_start_day(datetime.now(UTC).date(), o.days)
            config = SimulatorConfig(users=o.users, items=o.items, requests_per_day=o.requests_per_day, seed=o.seed, start_day=start_day)
            self._say(
                f"simulating {o.days} day{'s' if o.days != 1 else ''} from {start_day}: {o.users:,} users, {o.items:,} items, "
                f"{o.requests_per_day:,} requests a day, seed {o.seed}"
            )
            return SimulatedLog(Simulator(config), o.days, s.data_dir / "events.jsonl", s).start()
        self._say(f"{events.description}: {len(events.events):,} events")
        return events

    def _write_run_file(self, bootstrap: str) -> None:
        """``<data_dir>/run.json``: where everything of this run is (ports, PIDs, logs)."""
        parts = {c.name: {"pid": c.pid, "log": str(c.log_path)} for c in self.children}
        if self.broker is not None:
            parts["broker"] = {"pid": self.broker.process.pid, "log": str(self.logs_dir / "broker.log")}
        record = {
            "pid": os.getpid(),
            "events": str(self.events.path),
            "broker": bootstrap,
            "service": self.service_url,
            "streams_metrics": f"{self.worker_url}/metrics",
            "parts": parts,
        }
        (self.settings.data_dir / "run.json").write_text(json.dumps(record, indent=2))

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
        or ``timeout`` seconds end the wait with an error naming the part.
        ``settle_for``: the log's last event time, to observe the completion
        facts (once a second: they read every batch manifest)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        settled, next_settled = None, 0.0
        while True:
            self._check_signal()
            self._check_deaths()
            if settle_for is not None and time.monotonic() >= next_settled:
                settled = observation.settled(self.settings, settle_for, self.service_url)
                next_settled = time.monotonic() + 1.0
            obs = self.last_observation = self._observe(settled)
            self._announce(obs)
            waiting = unfinished(obs) if settle_for is not None else None
            self.show(status_line(obs) + (f" | waiting: {waiting[0]}" if waiting else ""))
            if done(obs):
                return
            if deadline is not None and time.monotonic() > deadline:
                part, why = waiting or (self._not_ready() or "replay", "not answering")
                raise Stalled(f"{what} did not happen within {timeout:.0f} s: {part}: {why}", part)
            time.sleep(0.5)

    def _check_deaths(self) -> None:
        broker = self.broker
        if broker is not None and broker.process is not None and broker.process.poll() is not None:
            path = self.logs_dir / "broker.log"
            tail = path.read_text(errors="replace").splitlines()[-20:] if path.is_file() else []
            raise PartDied("broker", exit_description(broker.process.returncode), path, tail)
        for child in self.children:
            if not child.alive and not child.stopping:
                raise PartDied(child.name, exit_description(child.returncode), child.log_path, child.log_tail())
        if self.events is not None and self.events.error is not None:
            raise PartDied("simulator", repr(self.events.error), None, [])
        if self.replay is not None and self.replay.error is not None:
            raise PartDied("replay", repr(self.replay.error), None, [])

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
        broker_up = self.broker is not None and self.broker.process is not None and self.broker.process.poll() is None
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
            parts_alive=sum(c.alive for c in self.children) + broker_up,
            parts_total=len(self.children) + (self.broker is not None),
            settled=settled,
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
            logs_dir=str(self.logs_dir),
        )

    def _stop_everything(self) -> dict[str, str]:
        """Stop the replay, every part (SIGTERM, then SIGKILL), then the broker."""
        if self.events is not None:
            self.events.stop()
        if self.replay is not None:
            self.replay.stop_requested.set()
            self.replay.join(10)
        ended = stop_all(self.children, self.options.stop_timeout_seconds)
        if self.broker is not None and self.broker.process is not None:
            running = self.broker.process.poll() is None
            code = self.broker.process.returncode
            self.broker.stop()
            ended["broker"] = "stopped" if running else exit_description(code)
        return ended
