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


def test_newcomers_are_born_during_the_days_and_appear_only_after_birth():
    from freshtower.app.simulator import Simulator, SimulatorConfig

    config = SimulatorConfig(users=400, items=1000, requests_per_day=3000, new_users_per_day=40, new_items_per_day=100, max_days=3, seed=2)
    simulator = Simulator(config)
    base = Simulator(SimulatorConfig(users=400, items=1000, requests_per_day=3000, seed=2))
    assert [r.ts_ms for r in simulator.requests(0)] == [r.ts_ms for r in base.requests(0)]  # day 0: nobody new yet
    for day in (1, 2):
        requests = simulator.requests(day)
        users = {r.user for r in requests}
        items = {i for r in requests for i in r.shown.tolist()}
        assert len({u for u in users if u >= 400}) > 10 and len({i for i in items if i >= 1000}) > 30
        assert all(simulator.user_birth_ms[r.user] <= r.ts_ms for r in requests)
        assert all(simulator.item_birth_ms[i] <= r.ts_ms for r in requests for i in r.shown.tolist())
        born_today = [u for u in users if u >= 400 and simulator.user_birth_ms[u] >= simulator.day_start_ms(day)]
        assert born_today  # users born that very day make requests that day
    # no newcomers by default: the world is the one it always was
    assert Simulator(SimulatorConfig(users=400, items=1000)).n_items == 1000
