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


def test_pair_affinity_makes_clicks_depend_on_the_pair_not_only_the_topic():
    import numpy as np

    plain = Simulator(SimulatorConfig(users=20, items=200, topics=4, seed=3))
    paired = Simulator(SimulatorConfig(users=20, items=200, topics=4, seed=3, pair_affinity=0.15))
    again = Simulator(SimulatorConfig(users=20, items=200, topics=4, seed=3, pair_affinity=0.15))
    interest = np.array([0.5, 0.2, 0.2, 0.1])  # 0.4 * 0.5 + 0.005 +- 0.15: never clipped
    same_topic = np.flatnonzero(paired.item_topic[: paired.n_items] == 0)[:50]
    assert len(np.unique(plain.click_probability(interest, same_topic, user=5))) == 1  # topic only: one value
    p = paired.click_probability(interest, same_topic, user=5)
    assert len(np.unique(p)) == len(same_topic) and float(p.max() - p.min()) > 0.2  # spread over +-0.15
    assert np.array_equal(p, again.click_probability(interest, same_topic, user=5))  # deterministic
    assert not np.array_equal(p, paired.click_probability(interest, same_topic, user=6))  # per user
    # a full-rank user x item matrix: its best rank-8 approximation leaves most of its variance
    pairs = np.stack([paired.pair_uniform(u, np.arange(200)) for u in range(20)]) - 0.5
    singular = np.linalg.svd(pairs, compute_uv=False) ** 2
    assert singular[8:].sum() / singular.sum() > 0.4
    assert [r.shown.tolist() for r in plain.requests(0)[:20]] == [
        r.shown.tolist() for r in Simulator(SimulatorConfig(users=20, items=200, topics=4, seed=3)).requests(0)[:20]
    ]
