"""Shared fixtures: seeded simulated data, written once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.settings import Settings, load_settings

# Small enough to generate in seconds, big enough to learn something:
# ~3,000 requests a day, ~7,000 clicks a day.
SMALL_WORLD = SimulatorConfig(users=600, items=300, topics=10, requests_per_day=3000, seed=1)
DAY0, DAY1 = "2026-11-20", "2026-11-21"  # the simulated days 0 and 1
TEST_WINDOW_SECONDS = 600.0  # ten-minute batches keep the file count low


@pytest.fixture(scope="session")
def small_simulator() -> Simulator:
    return Simulator(SMALL_WORLD)


@pytest.fixture(scope="session")
def simulated_batches(tmp_path_factory, small_simulator) -> Path:
    """Three simulated days of batch files (read-only: copy before writing)."""
    root = tmp_path_factory.mktemp("simulated") / "batches"
    for day in range(3):
        small_simulator.write_batches(root, day, TEST_WINDOW_SECONDS)
    return root


def make_settings(data_dir: Path, **overrides) -> Settings:
    """Settings for tests: small frequency arrays, no wall-clock checkpoints."""
    overrides.setdefault("frequency", {"buckets": 1 << 14})
    training = overrides.setdefault("training", {})
    training.setdefault("checkpoint_every_seconds", 1e9)
    return load_settings(data_dir=data_dir, **overrides)


@pytest.fixture
def data_dir_with_batches(tmp_path, simulated_batches) -> Path:
    """A fresh data directory holding a copy of the simulated batches."""
    data_dir = tmp_path / "data"
    shutil.copytree(simulated_batches, data_dir / "batches")
    return data_dir


@pytest.fixture(scope="session")
def day0_model_dir(tmp_path_factory, simulated_batches) -> Path:
    """Simulated batches + the day-0 full model (read-only: copy before use)."""
    from freshtower.trainer.full import train_full

    data_dir = tmp_path_factory.mktemp("day0") / "data"
    shutil.copytree(simulated_batches, data_dir / "batches")
    train_full(make_settings(data_dir), DAY0)
    return data_dir


@pytest.fixture
def data_dir(tmp_path, day0_model_dir) -> Path:
    """A fresh copy of ``day0_model_dir``."""
    copy = tmp_path / "data"
    shutil.copytree(day0_model_dir, copy)
    return copy


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A real Kafka-protocol broker (Tansu) on a free loopback port, for the
    whole session; stopped at the end."""
    from freshtower.streams.broker import LocalBroker, resolve_binary

    home = tmp_path_factory.mktemp("broker-home")
    broker = LocalBroker(binary=resolve_binary(home), log_path=home / "broker.log")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def running_in_group(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid``:
    what a stopped part must not leave behind. Reads /proc (Linux)."""
    live = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry.name))
    return live


from tests.storage_faults import small_disk  # noqa: E402,F401  (a fixture: a real full disk, a read-only one)
