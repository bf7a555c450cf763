"""Child processes of a supervised run (``supervisor.py``): each part runs as its own
``freshtower`` subcommand, with its output in a log file, in a session of
its own (a Ctrl-C in the terminal reaches only the supervisor, which then
stops the parts in order), and is stopped with SIGTERM to its whole process
group, then SIGKILL after a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from pathlib import Path


class ChildProcess:
    """One part of the pipeline as a child process."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.stopping = False  # a stop was asked for: an exit now is not a death

    def start(self) -> ChildProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> list[str]:
        return log_tail(self.log_path, lines)

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the child's process group (its own helpers, e.g.
        the online trainer's decoder process, go with it)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of a log file ([] if there is none)."""
    if not path.is_file():
        return []
    with open(path, errors="replace") as handle:
        return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]


def exit_description(returncode: int | None) -> str:
    """How a process ended, from ``Popen.returncode``.

    >>> exit_description(-9), exit_description(3)
    ('killed by SIGKILL', 'exit code 3')
    """
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def stop_all(children: list[ChildProcess], timeout: float) -> dict[str, str]:
    """SIGTERM every child's group at once, wait up to ``timeout`` seconds,
    then SIGKILL the rest; returns how each ended. Leftovers of a group whose
    leader has exited are killed too, so nothing outlives the run."""
    for child in children:
        child.stopping = True
        if child.alive:
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    ended = {}
    for child in children:
        if child.process is None:
            continue
        if child.alive:
            child.signal_group(signal.SIGKILL)
            child.process.wait(10)
            ended[child.name] = f"killed after {timeout:.0f} s (did not stop on SIGTERM)"
        else:
            ended[child.name] = exit_description(child.returncode)
        child.signal_group(signal.SIGKILL)  # anything the part left behind in its group
    for child in children:
        # kill() only queues the signal: wait until the group's members are
        # gone, so that nothing the run started outlives stop_all.
        if child.process is not None:
            wait_group_gone(child.process.pid, timeout=10.0)
    return ended


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid`` (Linux /proc)."""
    live = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry.name))
    return live


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until no live process is left in group
    ``pgid``; True if none is."""
    deadline = time.monotonic() + timeout
    while live_group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
