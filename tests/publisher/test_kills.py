"""The recall service SIGKILLed at a seeded random request of a stream and
started again, as a process manager would: it comes back on the same
active release, checksummed, and answers exactly as before the kill; only
requests sent while no process listened fail (one replica: nothing else
could answer them)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import httpx
import pytest
from freshtower.publisher.releases import ReleaseStore

from freshtower.app.supervisor import child_environment
from freshtower.core.batches import read_batch
from freshtower.core.ports import free_port
from tests.publisher.test_service import published, request_for  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow
REQUESTS = 300


class Service:
    """``freshtower serve`` in a process of its own, on a free loopback port."""

    def __init__(self, settings, log_path):
        self.settings = settings.model_copy(update={"service": settings.service.model_copy(update={"port": free_port()})})
        self.url = f"http://127.0.0.1:{self.settings.service.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> Service:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "freshtower.app.cli", "serve", "--port", str(self.settings.service.port)],
                env=child_environment(self.settings, os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self

    def wait_serving(self, version: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=2).json().get("serving") == version:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"service does not serve {version} after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)


def test_a_service_killed_mid_stream_comes_back_on_the_same_release_with_the_same_answers(published, tmp_path):
    settings, trainer, _, active = published
    samples = read_batch(trainer.pending()[0], trainer.spec)
    requests = [request_for(samples, i % min(40, len(samples))) for i in range(REQUESTS)]
    kill_at = random.Random(15).randrange(REQUESTS // 4, 3 * REQUESTS // 4)
    service = Service(settings, tmp_path / "serve.log").start()
    try:
        service.wait_serving(active)
        answers, failed_at, down_since, outage = {}, [], time.monotonic(), None
        with httpx.Client(base_url=service.url, timeout=5) as http:
            for i, request in enumerate(requests):
                if i == kill_at:
                    service.kill()
                    service.start()  # the process manager starts it again at once
                    down_since = time.monotonic()
                while True:  # a client that retries a refused connection
                    try:
                        response = http.post("/v1/recall", json=request)
                        if response.status_code != 503:  # 503: up, its release not loaded yet
                            break
                    except httpx.TransportError:
                        pass
                    failed_at.append(i)
                    assert time.monotonic() - down_since < 120, service.log_path.read_text()[-3000:]
                    time.sleep(0.1)
                assert response.status_code == 200, response.text
                answers[i] = response.json()
                if i == kill_at:
                    outage = time.monotonic() - down_since
        assert set(failed_at) == {kill_at}  # only while no process listened; every other request answered 200
        service.wait_serving(active)
        store = ReleaseStore(settings.releases_dir)
        assert store.active_version() == active
        for release in store.chain(active):
            store.verify(release.version)
        # The same answer to the same request before and after the restart.
        same = [(i, j) for i in answers for j in answers if i < kill_at <= j and requests[i] == requests[j]]
        assert same and all(answers[i]["items"] == answers[j]["items"] for i, j in same)
        print(f"\nservice killed at request {kill_at} of {REQUESTS}: {len(failed_at)} failed attempts (one request, retried) "
              f"(answering again {outage:.1f} s after the kill), "
              f"{len(same)} repeated requests answered the same")
    finally:
        service.stop()
