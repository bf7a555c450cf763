"""The recall service under load while releases change under it: a real
``freshtower serve`` process on loopback, the load client in another
process (closed loop, 4 keep-alive connections: as many requests as the
service can answer, so at its capacity), and this process making real
releases with the real Publisher from a real online trainer: an embeddings
release every 2 s for 60 s, a full release after a third of it and a
rollback (the admin API) after two thirds. Every loop is bounded in count
and time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from freshtower.publisher.load_client import wait_for_port
from freshtower.publisher.publish import Publisher
from freshtower.trainer.online import OnlineTrainer

from freshtower.core.batches import read_batch
from freshtower.core.ports import free_port
from tests.publisher.conftest import DAY1, publisher_settings
from tests.publisher.test_publish import copy_full_model
from tests.publisher.test_service import request_for

TOKEN = "load-test-admin-token"
LOAD_SECONDS = 60.0
RELEASE_EVERY_SECONDS = 2.0


def serve(data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "FRESHTOWER_DATA_DIR": str(data_dir),
        "FRESHTOWER_SERVICE__PORT": str(port),
        "FRESHTOWER_SERVICE__ADMIN_TOKEN": TOKEN,
        "FRESHTOWER_SERVICE__POLL_SECONDS": "0.1",
        "PYTHONPATH": os.getcwd(),
    }
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "freshtower.app.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)


def load(port: int, bodies: Path, out: Path, connections: int, seconds: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "freshtower.publisher.load_client", "run", "--port", str(port), "--bodies", str(bodies)]
    command += ["--connections", str(connections), "--seconds", str(seconds), "--max-requests", "500000", "--out", str(out)]
    return subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.getcwd()})


def summary(result: dict) -> dict:
    ms = np.asarray(result["latencies"]) * 1000
    return {
        "requests": result["requests"],
        "rate": result["requests"] / result["wall_seconds"],
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "statuses": result["statuses"],
        "failures": result["failure_count"],
    }


@pytest.mark.slow
def test_sixty_seconds_at_capacity_with_a_release_every_two_seconds_fail_no_request(data_dir, tmp_path):
    settings = publisher_settings(data_dir, training={"threads": 1})
    trainer = OnlineTrainer.start(settings)
    trainer.run(max_batches=2, prefetch=False)
    with Publisher(settings) as publisher:
        first_full, first_delta = publisher.tick(now_s=0.0)
    assert first_delta.status == "published"
    samples = read_batch(trainer.pending()[0], trainer.spec)
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("".join(json.dumps(request_for(samples, i, k=50)) + "\n" for i in range(min(len(samples), 500))))

    port = free_port()
    server = serve(data_dir, port, tmp_path / "serve.log")
    served: Counter = Counter()  # release -> answers seen by the watcher below
    wrong: list[str] = []  # the watcher's answers that were not a full 200
    try:
        wait_for_port("127.0.0.1", port, 60)
        admin = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        deadline = time.monotonic() + 30
        while admin.get("/healthz").json().get("serving") != first_delta.version:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.05)

        # capacity first, with nothing else running: 4 connections for 3 s
        probe = load(port, bodies, tmp_path / "capacity.json", 4, 3.0)
        assert probe.wait(60) == 0
        capacity = summary(json.loads((tmp_path / "capacity.json").read_text()))

        stop = threading.Event()

        def watch() -> None:  # which release answers, and whether in full, every 0.1 s (bounded: at most 1,000 looks)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                for _ in range(1000):
                    if stop.wait(0.1):
                        return
                    response = http.post("/v1/recall", json=request_for(samples, 0, k=5))
                    answer = response.json()
                    if response.status_code != 200 or len(answer["items"]) != 5:
                        wrong.append(f"{response.status_code}: {response.text[:200]}")
                    else:
                        served[answer["releases"]["active"]] += 1

        watcher = threading.Thread(target=watch)
        watcher.start()
        client = load(port, bodies, tmp_path / "load.json", 4, LOAD_SECONDS)
        started = time.monotonic()
        releases, full, rolled_back_to = [], None, None
        with Publisher(settings) as publisher:
            for round_ in range(int(LOAD_SECONDS / RELEASE_EVERY_SECONDS)):
                wait = started + (round_ + 1) * RELEASE_EVERY_SECONDS - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if time.monotonic() - started > LOAD_SECONDS - 1:
                    break
                now_s = 1e6 * (round_ + 1)
                if round_ == 10:  # a new full model, released in the middle of the load
                    copy_full_model(settings, DAY1)
                    full = publisher.publish_full_if_new(now_s=now_s)
                    assert full.status == "published", full
                    releases.append(full.version)
                    continue
                if round_ == 20:  # a rollback to the full release, through the admin API
                    rolled_back_to = full.version
                    response = admin.post(f"/v1/releases/{full.version}/activate", headers={"Authorization": f"Bearer {TOKEN}"})
                    assert response.status_code == 200, response.text
                    releases.append(full.version)
                    continue
                trainer.run(max_batches=1, prefetch=False)  # re-bases onto the new full model after round 10
                outcome = publisher.publish_delta_if_due(now_s=now_s)
                assert outcome.status == "published", outcome
                releases.append(outcome.version)
        assert client.wait(LOAD_SECONDS + 60) == 0
        stop.set()
        watcher.join(30)
        under_swaps = summary(json.loads((tmp_path / "load.json").read_text()))
        health = admin.get("/healthz").json()
        metrics = admin.get("/metrics").text
        admin.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    print(f"\ncapacity, 4 connections, no releases: {capacity}")
    print(f"60 s with {len(releases)} releases (one every {RELEASE_EVERY_SECONDS} s, a full one and a rollback among them): {under_swaps}")
    print(f"answers seen by release: {dict(served)}")
    assert under_swaps["failures"] == 0 and set(under_swaps["statuses"]) == {"200"}, under_swaps
    assert wrong == []
    assert under_swaps["requests"] >= 0.3 * capacity["rate"] * LOAD_SECONDS  # the load ran throughout, near capacity
    assert len(releases) >= 25 and full is not None and rolled_back_to is not None
    assert health["serving"] == releases[-1] and health["status"] == "ok"
    swaps = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("freshtower_release_swaps_total"))
    assert swaps >= len(releases) * 0.8  # the service followed (nearly) every release; a few may be skipped between polls
    assert rolled_back_to in served and len(served) >= 10  # answers came from many releases, the rolled-back-to one among them
