"""Fixtures for publisher tests: a day-0 full model on the simulated data,
copied per test, and settings with Kafka off unless a test turns it on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from freshtower.trainer.full import train_full

from freshtower.core.settings import Settings
from tests.conftest import make_settings

DAY0, DAY1 = "2026-11-20", "2026-11-21"


def publisher_settings(data_dir: Path, **overrides) -> Settings:
    publisher = {"kafka_enabled": False, "publish_interval_seconds": 60.0, **overrides.pop("publisher", {})}
    service = {"poll_seconds": 0.05, **overrides.pop("service", {})}
    return make_settings(data_dir, publisher=publisher, service=service, **overrides)


@pytest.fixture(scope="session")
def day0_model_dir(tmp_path_factory, simulated_batches) -> Path:
    """Simulated batches + the day-0 full model (read-only: copy before use)."""
    data_dir = tmp_path_factory.mktemp("publisher") / "data"
    shutil.copytree(simulated_batches, data_dir / "batches")
    train_full(make_settings(data_dir), DAY0)
    return data_dir


@pytest.fixture
def data_dir(tmp_path, day0_model_dir) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(day0_model_dir, copy)
    return copy
