"""Fixtures for publisher tests: settings with Kafka off unless a test
turns it on, and moto's S3 server (the day-0 model: tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from freshtower.core.ports import free_port
from freshtower.core.settings import Settings
from tests.conftest import DAY0, DAY1, make_settings  # noqa: F401  (DAY0, DAY1: for the tests that import them here)


def publisher_settings(data_dir: Path, **overrides) -> Settings:
    publisher = {"kafka_enabled": False, "publish_interval_seconds": 60.0, **overrides.pop("publisher", {})}
    service = {"poll_seconds": 0.05, **overrides.pop("service", {})}
    return make_settings(data_dir, publisher=publisher, service=service, **overrides)


class MotoServer:
    """moto's standalone S3 server (``python -m moto.server``) on a free loopback port."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server on {self.endpoint} did not answer within {timeout:.0f} s")

    def client(self):
        import boto3

        credentials = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **credentials)

    def new_bucket(self) -> str:
        name = f"releases-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server on loopback, for the whole session; tests take a bucket each."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


def s3_overrides(server: MotoServer, bucket: str, prefix: str = "prod") -> dict:
    """Settings that put the release store in ``bucket`` on ``server``."""
    return {
        "release_store": f"s3://{bucket}/{prefix}",
        "s3_endpoint_url": server.endpoint,
        "s3_access_key_id": "test",
        "s3_secret_access_key": "test",
    }
