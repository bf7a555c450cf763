"""The supervisor with real child processes (small Python scripts): deaths
reported with their logs, bounded waits, one-shot parts, signals, and
nothing left running however the block is left."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from freshtower.app.supervisor import Interrupted, PartDied, Stalled, Supervisor
from tests.conftest import running_in_group

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def group_gone(pgid: int, timeout: float = 5.0) -> bool:
    """No live process left in the group (a SIGKILLed one exits a moment after the signal)."""
    deadline = time.monotonic() + timeout
    while running_in_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running_in_group(pgid) == []


def failing(code: int, line: str = "about to fail") -> list[str]:
    return [sys.executable, "-c", f"print({line!r}, flush=True); raise SystemExit({code})"]


def test_a_part_that_exits_is_a_death_with_its_log_tail(tmp_path):
    with Supervisor(tmp_path / "logs", poll_seconds=0.05) as supervisor:
        supervisor.start("sleeper", SLEEPER, dict(os.environ))
        supervisor.start("failing", failing(3), dict(os.environ))
        with pytest.raises(PartDied) as died:
            supervisor.wait(lambda: False, 30, "nothing")
    assert (died.value.name, died.value.how) == ("failing", "exit code 3")
    assert died.value.log_path == tmp_path / "logs" / "failing.log" and died.value.tail == ["about to fail"]
    assert supervisor.ended["sleeper"] == "killed by SIGTERM"  # stopped on the way out


def test_a_wait_that_runs_out_names_the_part_to_blame(tmp_path):
    with Supervisor(tmp_path / "logs", poll_seconds=0.05) as supervisor:
        supervisor.start("sleeper", SLEEPER, dict(os.environ))
        started = time.monotonic()
        with pytest.raises(Stalled) as stalled:
            supervisor.wait(lambda: False, 0.3, "the sleeper waking", lambda: ("sleeper", "still asleep"))
        assert 0.3 <= time.monotonic() - started < 5
    assert stalled.value.part == "sleeper"
    assert str(stalled.value) == "the sleeper waking did not happen within 0 s: sleeper: still asleep"


def test_a_wait_returns_what_done_returned(tmp_path):
    answers = iter([None, {}, {"ready": True}])
    with Supervisor(tmp_path / "logs", poll_seconds=0.01) as supervisor:
        assert supervisor.wait(lambda: next(answers), 5, "an answer") == {"ready": True}


def test_leaving_the_block_on_an_error_stops_every_part_and_its_group(tmp_path):
    # a part with a helper in its process group, as the online trainer's decoder
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    with pytest.raises(KeyboardInterrupt):
        with Supervisor(tmp_path / "logs", stop_timeout_seconds=5) as supervisor:
            child = supervisor.start("parent", [sys.executable, "-c", script], dict(os.environ))
            time.sleep(0.5)
            raise KeyboardInterrupt  # e.g. the experiment's SIGTERM handler
    assert not child.alive and group_gone(child.pid)
    assert supervisor.ended == {"parent": "killed by SIGTERM"}


def test_a_one_shot_part_runs_to_its_end_and_its_failure_is_a_death(tmp_path):
    with Supervisor(tmp_path / "logs", poll_seconds=0.05) as supervisor:
        supervisor.start("sleeper", SLEEPER, dict(os.environ))
        done = supervisor.run_once("ok", failing(0, "done"), dict(os.environ), 30, "ok ending")
        assert done.returncode == 0 and done.log_tail() == ["done"]
        supervisor.check()  # a one-shot that ended is no death
        with pytest.raises(PartDied, match="part bad stopped on its own \\(exit code 2\\)"):
            supervisor.run_once("bad", failing(2), dict(os.environ), 30, "bad ending")
        with pytest.raises(Stalled, match="slow ending did not happen within 0 s: slow: still running"):
            supervisor.run_once("slow", SLEEPER, dict(os.environ), 0.2, "slow ending")
        assert not supervisor.part("slow").alive  # stopped when its wait ran out


def test_a_part_stopped_on_purpose_is_no_death(tmp_path):
    with Supervisor(tmp_path / "logs", poll_seconds=0.05) as supervisor:
        supervisor.start("sleeper", SLEEPER, dict(os.environ))
        assert supervisor.stop("sleeper") == "killed by SIGTERM"
        supervisor.check()
        assert supervisor.alive() == (0, 1)


def test_a_signal_interrupts_the_wait_and_the_handlers_come_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    heard = []
    with Supervisor(tmp_path / "logs", poll_seconds=0.05, catch_signals=True) as supervisor:
        supervisor.on_signal(heard.append)
        supervisor.start("sleeper", SLEEPER, dict(os.environ))
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Interrupted, match="interrupted by SIGTERM"):
            supervisor.wait(lambda: False, 30, "nothing")
    assert heard == [signal.SIGTERM] and supervisor.stopping
    assert signal.getsignal(signal.SIGTERM) is before
    assert supervisor.ended["sleeper"] == "killed by SIGTERM"


def test_a_configured_cluster_is_used_and_no_broker_is_started(tmp_path):
    with Supervisor(tmp_path / "logs") as supervisor:
        assert supervisor.bootstrap("kafka.example:9092") == "kafka.example:9092"
        assert supervisor.broker is None and supervisor.processes() == {}


def test_with_restart_parts_a_part_that_dies_is_started_again_until_its_restarts_run_out(tmp_path):
    counter = tmp_path / "starts"
    # each start appends a line, then dies; the third start (second restart) lives
    script = (
        f"import pathlib, time; p = pathlib.Path({str(counter)!r}); n = len(p.read_text().splitlines()) if p.exists() else 0; "
        "p.write_text('x\\n' * (n + 1)); print('start', n, flush=True); time.sleep(60 if n >= 2 else 0); raise SystemExit(4)"
    )
    restarted = []
    with Supervisor(tmp_path / "logs", poll_seconds=0.05, restart_parts=2) as supervisor:
        supervisor.on_restart.append(restarted.append)
        first = supervisor.start("flaky", [sys.executable, "-c", script], dict(os.environ))
        supervisor.wait(lambda: supervisor.restarts.get("flaky") == 2 and supervisor.parts["flaky"].alive, 30, "two restarts")
        assert supervisor.parts["flaky"].pid != first.pid
        supervisor.wait(lambda: len(counter.read_text().splitlines()) == 3, 30, "the third start")
        assert restarted == ["flaky", "flaky"]
        os.killpg(supervisor.parts["flaky"].pid, signal.SIGKILL)  # a third death: no restarts left
        with pytest.raises(PartDied) as died:
            supervisor.wait(lambda: False, 30, "nothing")
    assert died.value.how == "killed by SIGKILL after 2 restarts"
    log = (tmp_path / "logs" / "flaky.log").read_text()
    assert "start 0" in log and "start 2" in log and "started again by the supervisor (restart 2)" in log


def test_without_restart_parts_the_first_death_ends_the_block(tmp_path):
    with Supervisor(tmp_path / "logs", poll_seconds=0.05) as supervisor:
        supervisor.start("failing", failing(5), dict(os.environ))
        with pytest.raises(PartDied) as died:
            supervisor.wait(lambda: False, 30, "nothing")
    assert died.value.how == "exit code 5" and supervisor.restarts == {}


def test_a_wait_with_progress_goes_on_while_the_work_moves_and_ends_once_it_stops(tmp_path):
    # A slow machine is not a stalled part: the deadline counts from the last change of the progress figure.
    ticks = iter(range(1_000_000))
    done_at = time.monotonic() + 0.6
    with Supervisor(tmp_path / "logs", poll_seconds=0.02) as supervisor:
        moving = supervisor.wait(lambda: time.monotonic() > done_at, 0.2, "a slow job", progress=lambda: next(ticks))
        assert moving  # 0.6 s of steady progress outlasts a 0.2 s timeout
        started = time.monotonic()
        with pytest.raises(Stalled, match="a stuck job did not happen within 0 s without progress: stuck: no change"):
            supervisor.wait(lambda: False, 0.2, "a stuck job", lambda: ("stuck", "no change"), progress=lambda: 7)
        assert 0.2 <= time.monotonic() - started < 5
