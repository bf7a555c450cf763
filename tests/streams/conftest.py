"""Fixtures for the streams worker tests: settings isolated per test on the
session broker, a real worker process, and readers for its topics."""

from __future__ import annotations

import json
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
from freshtower.core.settings import Settings, load_settings


def streams_settings(bootstrap: str, data_dir: Path, **streams) -> Settings:
    """Settings with topics and consumer group of their own, so tests share
    the session broker without seeing each other's events."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return load_settings(
        kafka=bootstrap,
        data_dir=data_dir,
        topics={
            "impressions": f"{prefix}-impressions",
            "clicks": f"{prefix}-clicks",
            "rank_logs": f"{prefix}-rank-logs",
            "dead_letters": f"{prefix}-dead-letters",
            "training_batches": f"{prefix}-training-batches",
        },
        streams={
            "app_id": f"{prefix}-streams",
            "window_seconds": 300,
            "idle_seconds": 2,
            "idle_advance_rate": 3600,  # once the log is read, event time runs an hour a second
            "commit_interval_seconds": 1,
            "web_port": free_port(),
            "log_every_seconds": 2,
            # The simulated days are sparse history (minutes between a partition's events at night):
            # the "ahead of the stream" bound must allow for quiet spells (docs/streams.md).
            "max_future_seconds": 3600,
        }
        | streams,
        frequency={"buckets": 1 << 14},
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The FRESHTOWER_* environment that reproduces ``settings`` in a child."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
    env.update(
        FRESHTOWER_KAFKA=settings.kafka,
        FRESHTOWER_DATA_DIR=str(settings.data_dir),
        FRESHTOWER_TOPICS=settings.topics.model_dump_json(),
        FRESHTOWER_STREAMS=settings.streams.model_dump_json(),
        FRESHTOWER_FREQUENCY=settings.frequency.model_dump_json(),
        FRESHTOWER_KAFKA_CLIENT=settings.kafka_client.model_dump_json(),
    )
    return env


class WorkerProcess:
    """``freshtower streams`` in a child process, watched through /stats."""

    def __init__(self, settings: Settings, log_path: Path):
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{settings.streams.web_port}"

    def start(self) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "freshtower.app.cli", "--log-level", "info", "streams"],
            env=settings_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.read()
        except OSError:
            return None

    def stats(self) -> dict | None:
        body = self.get("/stats")
        return json.loads(body) if body else None

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        stats = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode} while waiting for {what}:\n{self.log_tail()}")
            stats = self.stats()
            if stats and stats.get("ready") and predicate(stats):
                return stats
            time.sleep(0.25)
        raise AssertionError(f"no {what} within {timeout:.0f} s; last stats {stats}\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            raise AssertionError(f"worker did not stop within {timeout:.0f} s of SIGTERM:\n{self.log_tail()}")


@pytest.fixture
def worker_factory(tmp_path):
    workers: list[WorkerProcess] = []

    def start(settings: Settings, name: str = "worker") -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"{name}-{len(workers)}.log").start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.process.poll() is None:
            os.killpg(worker.process.pid, signal.SIGKILL)
            worker.process.wait(10)


def read_topic(bootstrap: str, topic: str, timeout: float = 30) -> list:
    """Every record of ``topic`` (all partitions), up to its end now."""
    from freshtower.streams.faust_transport import true_end_offsets
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return []
        ends = true_end_offsets(bootstrap, consumer.end_offsets(partitions))
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end within {timeout:.0f} s")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def committed_and_end_offsets(bootstrap: str, group: str, topics: list[str]) -> tuple[dict, dict]:
    """The group's committed offset and the true end offset of every
    partition of ``topics``."""
    from freshtower.streams.faust_transport import true_end_offsets
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
        committed = {tp: consumer.committed(tp) for tp in partitions}
        ends = true_end_offsets(bootstrap, consumer.end_offsets(partitions))
    finally:
        consumer.close()
    return committed, ends
