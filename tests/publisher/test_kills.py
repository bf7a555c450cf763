"""The recall service SIGKILLed at a seeded random request of a stream and
started again, as a process manager would: it comes back on the same
active release, checksummed, and answers exactly as before the kill; only
requests sent while no process listened fail (one replica: nothing else
could answer them)."""

from __future__ import annotations

import os
import random
import time

import httpx
import pytest
from freshtower.publisher.releases import ReleaseStore

from freshtower.app.supervisor import child_environment
from freshtower.core.batches import read_batch
from freshtower.core.ports import free_port
from tests.publisher.service_process import ServiceProcess
from tests.publisher.test_service import published, request_for  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow
REQUESTS = 300


def service_process(settings, log_path) -> ServiceProcess:
    port = free_port()
    settings = settings.model_copy(update={"service": settings.service.model_copy(update={"port": port})})
    return ServiceProcess(child_environment(settings, os.environ), port, log_path)


def test_a_service_killed_mid_stream_comes_back_on_the_same_release_with_the_same_answers(published, tmp_path):
    settings, trainer, _, active = published
    samples = read_batch(trainer.pending()[0], trainer.spec)
    requests = [request_for(samples, i % min(40, len(samples))) for i in range(REQUESTS)]
    kill_at = random.Random(15).randrange(REQUESTS // 4, 3 * REQUESTS // 4)
    service = service_process(settings, tmp_path / "serve.log").start()
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
                    assert time.monotonic() - down_since < 120, service.log_tail()
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
