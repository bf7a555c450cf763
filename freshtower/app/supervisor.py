"""The supervisor: the parts of a run as child processes, watched.

Used by ``freshtower run`` (every part) and by ``freshtower experiment``
(the broker and a streams worker). What it does, and nothing else:

- starts the embedded broker when no Kafka cluster is configured
  (``bootstrap``), its output in ``<logs>/broker.log``;
- starts each part as a ``python -m freshtower.app.cli ...`` child
  (``cli_command``) in a session of its own, its output in
  ``<logs>/<name>.log`` (``processes.ChildProcess``);
- ``check()``: raises ``PartDied`` (name, how it ended, log path and tail)
  when the broker, a part or a watched thread has ended on its own (with
  ``restart_parts`` N > 0 a part that died is first started again with the
  same command line, up to N times a part, counted in ``restarts``), and
  ``Interrupted`` once SIGINT / SIGTERM arrived (with ``catch_signals``);
- ``wait(done, timeout, what)``: polls ``done`` twice a second, calling
  ``check()`` first each time, until ``done`` returns something true or
  ``timeout`` seconds pass (``Stalled``, naming the part to blame);
- ``run_once``: a one-shot part (e.g. a final publish) run to its end
  with a deadline, its non-zero exit a ``PartDied``;
- on leaving the ``with`` block, however it is left (a return, an error,
  a signal), every part is stopped (SIGTERM to its process group, SIGKILL
  after ``stop_timeout_seconds``), then the broker; ``ended`` says how
  each part ended.

``docs/run.md`` describes how ``freshtower run`` uses it.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from freshtower.app.processes import ChildProcess, exit_description, log_tail, stop_all
from freshtower.core.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)


class PartDied(RuntimeError):
    """A part ended on its own (or a one-shot part failed)."""

    def __init__(self, name: str, how: str, log_path: Path | None, tail: list[str]):
        super().__init__(f"part {name} stopped on its own ({how})")
        self.name, self.how, self.log_path, self.tail = name, how, log_path, tail


class Stalled(RuntimeError):
    """A wait ran out of time; ``part`` is the one that did not finish."""

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def cli_command(*args: str, python: str = sys.executable, log_level: str = "info") -> list[str]:
    """A part's command line: a ``freshtower`` subcommand in this Python.

    >>> cli_command("streams", python="python")
    ['python', '-m', 'freshtower.app.cli', '--log-level', 'info', 'streams']
    """
    return [python, "-m", "freshtower.app.cli", "--log-level", log_level, *args]


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


class Supervisor:
    """The broker and the parts of one run; a context manager that stops them all on exit."""

    def __init__(
        self,
        logs_dir: Path,
        *,
        stop_timeout_seconds: float = 20.0,
        poll_seconds: float = 0.5,
        catch_signals: bool = False,
        restart_parts: int = 0,
    ):
        self.logs_dir = logs_dir
        self.restart_parts = restart_parts  # a part that dies is started again up to this many times (0: its death ends the run)
        self.restarts: dict[str, int] = {}  # part -> times started again after it died
        self.on_restart: list[Callable[[str], None]] = []  # called with the part's name after each restart (the broker's too)
        self.stop_timeout_seconds = stop_timeout_seconds
        self.poll_seconds = poll_seconds
        self.catch_signals = catch_signals  # else SIGINT / SIGTERM keep their handlers (e.g. KeyboardInterrupt unwinds the block)
        self.parts: dict[str, ChildProcess] = {}  # long-running: an exit is a death
        self.one_shots: list[ChildProcess] = []  # run to their end: stopped on exit if still running
        self.broker = None  # streams.broker.LocalBroker when embedded
        self.object_store = None  # streams.durable_broker.ObjectStoreServer under a durable broker
        self.broker_restarts = 0  # a durable broker that died, started again on its port
        self.max_broker_restarts = 10
        self.signal_received: int | None = None
        self.ended: dict[str, str] = {}  # after exit: how each part ended
        self._threads: dict[str, Callable[[], BaseException | None]] = {}
        self._on_signal: list[Callable[[int], None]] = []
        self._previous_handlers: dict[int, Any] = {}

    # --- the block -----------------------------------------------------------------------

    def __enter__(self) -> Supervisor:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        if self.catch_signals:
            self._previous_handlers = {s: signal.signal(s, self._signalled) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.ended = self.stop_everything()
        finally:
            for s, handler in self._previous_handlers.items():
                signal.signal(s, handler)
            self._previous_handlers = {}

    def on_signal(self, callback: Callable[[int], None]) -> None:
        """Also call ``callback(signum)`` when a signal arrives (e.g. to stop a replay thread)."""
        self._on_signal.append(callback)

    def _signalled(self, signum, frame) -> None:
        if self.signal_received is None:
            self.signal_received = signum
        for callback in self._on_signal:
            callback(signum)

    @property
    def stopping(self) -> bool:
        """A signal arrived: loops outside ``wait`` (a replay) should end."""
        return self.signal_received is not None

    # --- starting --------------------------------------------------------------------------

    @property
    def broker_log(self) -> Path:
        return self.logs_dir / "broker.log"

    @property
    def object_store_log(self) -> Path:
        return self.logs_dir / "object-store.log"

    def bootstrap(self, kafka: str | None, durable: bool = False) -> str:
        """``kafka`` when set (a cluster of the user's), else an embedded
        broker started now on a free loopback port; its bootstrap address.
        ``durable``: the broker's storage is an S3 server started first
        (``streams.durable_broker``), and a broker that dies is started
        again on its port. A broker that does not come up is a ``PartDied``."""
        if kafka is not None:
            return kafka
        from freshtower.streams.broker import BrokerError, LocalBroker

        try:
            if durable:
                from freshtower.streams.durable_broker import ObjectStoreServer, durable_broker

                self.object_store = ObjectStoreServer(log_path=self.object_store_log).start()
                self.broker = durable_broker(self.object_store, log_path=self.broker_log).start()
            else:
                self.broker = LocalBroker(log_path=self.broker_log).start()
        except BrokerError as error:
            raise PartDied("broker", str(error), self.broker_log, log_tail(self.broker_log)) from error
        return self.broker.bootstrap

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> ChildProcess:
        """Start a long-running part; from now on its exit is a death."""
        if name in self.parts:
            raise ValueError(f"a part named {name} was started already")
        child = self.parts[name] = ChildProcess(name, argv, env, self.logs_dir / f"{name}.log").start()
        return child

    def _broker_ended(self, broker) -> None:
        """A durable broker lost nothing when it died: start it again on its
        port (as a process manager would), up to ``max_broker_restarts``.
        A memory broker took every topic with it: that ends the run."""
        how = exit_description(broker.process.returncode)
        if self.object_store is None or self.broker_restarts >= self.max_broker_restarts:
            raise PartDied("broker", how, self.broker_log, log_tail(self.broker_log))
        from freshtower.streams.broker import BrokerError

        self.broker_restarts += 1
        log.warning("broker %s; starting it again on %s (restart %d)", how, broker.bootstrap, self.broker_restarts)
        broker.stop()
        try:
            broker.start()
        except BrokerError as error:
            raise PartDied("broker", f"{how}, and did not start again: {error}", self.broker_log, log_tail(self.broker_log)) from error
        self._restarted("broker")

    def _part_ended(self, child: ChildProcess) -> None:
        """A part that died: started again with the same command line and
        environment while it has restarts left, else a ``PartDied``."""
        how = exit_description(child.returncode)
        done = self.restarts.get(child.name, 0)
        if done >= self.restart_parts:
            suffix = f" after {done} restart{'s' if done != 1 else ''}" if done else ""
            raise PartDied(child.name, how + suffix, child.log_path, child.log_tail())
        self.restarts[child.name] = done + 1
        log.warning("part %s %s; starting it again (restart %d of %d)", child.name, how, done + 1, self.restart_parts)
        child.signal_group(signal.SIGKILL)  # what it left behind in its group (e.g. a decoder process)
        with open(child.log_path, "a") as handle:
            handle.write(f"--- {child.name} {how}; started again by the supervisor (restart {done + 1}) ---\n")
        self.parts[child.name] = ChildProcess(child.name, child.argv, child.env, child.log_path).start()
        self._restarted(child.name)

    def _restarted(self, name: str) -> None:
        for callback in self.on_restart:
            callback(name)

    def watch_thread(self, name: str, error: Callable[[], BaseException | None]) -> None:
        """Treat an in-process thread as a part: ``error()`` not None is its death."""
        self._threads[name] = error

    # --- watching --------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``Interrupted`` after a signal, ``PartDied`` for the first
        part (broker, child, thread) that has ended on its own."""
        if self.signal_received is not None:
            raise Interrupted(self.signal_received)
        broker = self.broker
        if broker is not None and broker.process is not None and broker.process.poll() is not None:
            self._broker_ended(broker)
        for child in list(self.parts.values()):
            if not child.alive and not child.stopping:
                self._part_ended(child)
        for name, error in self._threads.items():
            failure = error()
            if failure is not None:
                raise PartDied(name, repr(failure), None, [])

    def wait(
        self,
        done: Callable[[], T],
        timeout: float | None,
        what: str,
        blame: Callable[[], tuple[str, str]] = lambda: ("?", "not done"),
        progress: Callable[[], object] | None = None,
    ) -> T:
        """Poll ``done()`` every ``poll_seconds`` (after ``check()``) until it
        returns something true, and return that. After ``timeout`` seconds
        (None: no deadline of its own) raise ``Stalled``; ``blame()`` names
        the part that had not finished and why. ``progress``: a figure of
        the work done so far (read after each ``done()``); while it changes
        the wait goes on, so ``timeout`` is then the longest time without
        progress, and a slow machine is not taken for a stalled part."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None if progress is None else progress()
        while True:
            self.check()
            result = done()
            if result:
                return result
            if progress is not None and timeout is not None and (now := progress()) != last:
                last, deadline = now, time.monotonic() + timeout
            if deadline is not None and time.monotonic() > deadline:
                part, why = blame()
                quiet = " without progress" if progress is not None else ""
                raise Stalled(f"{what} did not happen within {timeout:.0f} s{quiet}: {part}: {why}", part)
            time.sleep(self.poll_seconds)

    def run_once(self, name: str, argv: list[str], env: dict[str, str], timeout: float, what: str) -> ChildProcess:
        """Run a one-shot part to its end, the other parts still watched;
        ``Stalled`` after ``timeout`` seconds (it is stopped), ``PartDied``
        if it exits non-zero. ``what``: the wait, for the message."""
        child = ChildProcess(name, argv, env, self.logs_dir / f"{name}.log").start()
        self.one_shots.append(child)
        try:
            self.wait(lambda: not child.alive, timeout, what, lambda: (name, "still running"))
        except Stalled:
            stop_all([child], self.stop_timeout_seconds)
            raise
        if child.returncode != 0:
            raise PartDied(name, exit_description(child.returncode), child.log_path, child.log_tail())
        return child

    # --- what there is ---------------------------------------------------------------------

    def part(self, name: str) -> ChildProcess | None:
        return self.parts.get(name) or next((c for c in self.one_shots if c.name == name), None)

    def alive(self) -> tuple[int, int]:
        """(parts running, parts started), the broker included."""
        broker_up = self.broker is not None and self.broker.process is not None and self.broker.process.poll() is None
        return sum(c.alive for c in self.parts.values()) + broker_up, len(self.parts) + (self.broker is not None)

    def processes(self) -> dict[str, dict]:
        """Each part's PID and log (``run.json``)."""
        found = {c.name: {"pid": c.pid, "log": str(c.log_path)} for c in self.parts.values()}
        if self.broker is not None and self.broker.process is not None:
            found["broker"] = {"pid": self.broker.process.pid, "log": str(self.broker_log)}
        return found

    # --- stopping --------------------------------------------------------------------------

    def stop(self, name: str) -> str:
        """Stop one part (SIGTERM, then SIGKILL); how it ended."""
        return stop_all([self.parts[name]], self.stop_timeout_seconds)[name]

    def stop_everything(self) -> dict[str, str]:
        """Every part and one-shot at once (SIGTERM, then SIGKILL after the
        timeout), then the broker; how each ended."""
        ended = stop_all([*self.parts.values(), *self.one_shots], self.stop_timeout_seconds)
        broker = self.broker
        if broker is not None and broker.process is not None:
            running = broker.process.poll() is None
            code = broker.process.returncode
            broker.stop()
            ended["broker"] = "stopped" if running else exit_description(code)
        if self.object_store is not None:
            self.object_store.stop()  # after the broker: it holds the broker's storage
        return ended
