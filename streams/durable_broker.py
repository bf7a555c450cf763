"""A broker that survives its own restart: Tansu's ``s3://`` storage engine
over moto's standalone S3 server, both on 127.0.0.1.

The embedded default keeps topics in memory, so a broker restart loses
every record not yet joined and every committed group offset. With
``durable_broker`` the supervisor starts an S3-compatible server first
(``moto_server``, the maintained S3 emulator; it honours the conditional
writes Tansu relies on), creates the bucket, and points the broker at it:
records and committed offsets are objects in that server, so a broker
killed and started again on the same port carries on where it stopped.
The S3 server itself keeps objects in its memory, so it must outlive the
broker (the supervisor starts it first and stops it last); with
``record_path`` it also records every request to a file, which a new S3
server can replay (``replay_recording``) so the data outlives it too.

Each producer batch is one S3 object, so small batches are slow on this
engine: producers should batch (the replay does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from freshtower.core.ports import free_port
from freshtower.streams.broker import BrokerError, LocalBroker, terminate

# moto accepts any credentials; Tansu (the AWS SDK for Rust) wants some set.
_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "freshtower",
    "AWS_SECRET_ACCESS_KEY": "freshtower",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


class ObjectStoreServer:
    """moto's standalone S3 server as a child process on ``host:port``.

    >>> ObjectStoreServer(port=19000).endpoint
    'http://127.0.0.1:19000'
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None, record_path: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.record_path = record_path
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ObjectStoreServer:
        env = {**os.environ, **_CREDENTIALS}
        if self.record_path is not None:
            env.update(MOTO_ENABLE_RECORDING="True", MOTO_RECORDER_FILEPATH=str(self.record_path))
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        command = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise BrokerError(f"S3 server exited with code {self.process.returncode} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"S3 server on {self.endpoint} did not answer within {timeout:.0f} s") from None
                time.sleep(0.2)

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=_CREDENTIALS["AWS_REGION"],
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)

    def replay_recording(self) -> None:
        """Replay the requests recorded by an earlier server (``record_path``)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/replay-recording", method="POST")
        with urllib.request.urlopen(request, timeout=60):
            pass

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            terminate(self.process, timeout)
        self.process = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None


def durable_broker(store: ObjectStoreServer, bucket: str = "tansu", **broker_options) -> LocalBroker:
    """A ``LocalBroker`` (not started) whose topics and offsets live in
    ``bucket`` of ``store`` (created if missing)."""
    store.create_bucket(bucket)
    env = {**_CREDENTIALS, "AWS_ENDPOINT": store.endpoint, "AWS_ALLOW_HTTP": "true"}
    return LocalBroker(storage_engine=f"s3://{bucket}/", env=env, **broker_options)
