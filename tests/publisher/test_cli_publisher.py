from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from freshtower.app.cli import app

runner = CliRunner()


def test_publish_and_serve_have_help():
    for args in (["publish", "--help"], ["serve", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_publish_once_releases_the_full_model_then_has_nothing_to_do(data_dir, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_DATA_DIR", str(data_dir))
    monkeypatch.setenv("FRESHTOWER_FREQUENCY__BUCKETS", "16384")
    result = runner.invoke(app, ["publish", "--once", "--no-kafka"])
    assert result.exit_code == 0, result.output
    full, delta = json.loads(result.stdout.strip().splitlines()[-1])
    assert (full["status"], full["version"]) == ("published", "00000001-full")
    assert delta["status"] == "skipped" and "no online checkpoint" in delta["reason"]
    result = runner.invoke(app, ["publish", "--once", "--no-kafka"])
    full, _ = json.loads(result.stdout.strip().splitlines()[-1])
    assert full["status"] == "skipped" and "was released as 00000001-full" in full["reason"]


@pytest.mark.slow
def test_serve_runs_the_service_on_loopback_until_terminated(data_dir):
    from freshtower.publisher.publish import Publisher

    from freshtower.core.ports import free_port
    from tests.publisher.conftest import publisher_settings

    with Publisher(publisher_settings(data_dir)) as publisher:
        full = publisher.publish_full_if_new(now_s=0.0)
    port = free_port()
    env = {**os.environ, "FRESHTOWER_DATA_DIR": str(data_dir), "FRESHTOWER_SERVICE__PORT": str(port), "PYTHONPATH": os.getcwd()}
    server = subprocess.Popen([sys.executable, "-m", "freshtower.app.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.status_code == 200, (
            server.stderr.read().decode()[-2000:] if server.poll() is not None else health
        )
        assert health.json()["serving"] == full.version
    finally:
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert server.wait(30) in (0, -signal.SIGTERM)
