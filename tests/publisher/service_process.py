"""``freshtower serve`` in a process of its own on a free loopback port, for
tests that kill it and start it again as a process manager would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def health(url: str) -> dict:
    """The service's ``/healthz`` answer, or {} while nothing answers."""
    try:
        return httpx.get(f"{url}/healthz", timeout=2).json()
    except (httpx.TransportError, ValueError):
        return {}


class ServiceProcess:
    """One ``freshtower serve`` process: ``env`` configures it (its port is
    ``port``), its output goes to ``log_path``."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path, name: str = "service"):
        self.env, self.port, self.log_path, self.name = env, port, log_path, name
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "freshtower.app.cli", "serve", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def wait_serving(self, version: str, timeout: float = 120.0) -> float:
        """Until ``/healthz`` says it serves ``version``; returns that moment
        (monotonic seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.process.returncode}: {self.log_tail()}")
            if health(self.url).get("serving") == version:
                return time.monotonic()
            time.sleep(0.01)
        raise AssertionError(f"{self.name} does not serve {version} after {timeout} s: {health(self.url)}\n{self.log_tail()}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
