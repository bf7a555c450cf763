"""The simulator's batch files hold exactly its samples."""

from __future__ import annotations

from collections import Counter

from freshtower.app.simulator import Simulator, SimulatorConfig
from tests.streams.oracle import batch_keys, expected_samples


def test_batches_of_consecutive_days_hold_every_sample_including_those_across_midnight(tmp_path):
    simulator = Simulator(SimulatorConfig(users=100, items=80, topics=5, requests_per_day=400, seed=2))
    expected = Counter(expected_samples(simulator, range(2)).keys())
    simulator.write_batches(tmp_path / "together", range(2), 60)
    assert batch_keys(tmp_path / "together") == expected
