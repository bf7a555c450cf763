from __future__ import annotations

import numpy as np
import pytest

from freshtower.core.fingerprints import fingerprint_strings
from freshtower.core.frequency import FrequencyEstimator


def sequential_reference(estimator: FrequencyEstimator, item_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The paper's rule, one occurrence at a time (the oracle for the
    vectorised update)."""
    last = estimator.last_step.copy()
    gap = estimator.gap.copy()
    buckets = estimator._buckets(fingerprint_strings(item_ids))
    step = estimator.step
    for n in range(len(item_ids)):
        step += 1
        for h in range(estimator.hashes):
            b = buckets[h, n]
            gap[h, b] = (1 - estimator.alpha) * gap[h, b] + estimator.alpha * (step - last[h, b])
            last[h, b] = step
    return last, gap


def test_vectorised_update_equals_the_sequential_rule():
    rng = np.random.default_rng(3)
    estimator = FrequencyEstimator(buckets=64, hashes=3, alpha=0.1)  # few buckets: collisions too
    for _ in range(5):
        ids = [f"i{k}" for k in rng.integers(0, 40, size=200)]  # many repeats within a call
        expected_last, expected_gap = sequential_reference(estimator, ids)
        estimator.update(ids)
        np.testing.assert_array_equal(estimator.last_step, expected_last)
        np.testing.assert_allclose(estimator.gap, expected_gap, rtol=1e-12)


def zipf_probabilities(n: int, exponent: float = 1.0) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


def test_stationary_stream_matches_exact_shares():
    rng = np.random.default_rng(0)
    p = zipf_probabilities(500)
    ids = [f"i{i}" for i in range(500)]
    stream = rng.choice(500, size=300_000, p=p)
    estimator = FrequencyEstimator(buckets=1 << 14, hashes=2, alpha=0.01)
    for start in range(0, len(stream), 1000):
        estimator.update([ids[i] for i in stream[start : start + 1000]])
    exact = np.bincount(stream, minlength=500) / len(stream)  # the exact count oracle
    estimate = estimator.probability(ids)
    top = np.argsort(-exact)[:50]
    relative_error = np.abs(estimate[top] - exact[top]) / exact[top]
    assert np.median(relative_error) < 0.08
    assert relative_error.max() < 0.3
    assert estimator.probability(["never-seen"])[0] == 0.0


def test_estimates_follow_a_popularity_shift():
    rng = np.random.default_rng(1)
    p = zipf_probabilities(200)
    before = p.copy()
    after = p[::-1].copy()  # the most popular item becomes the least, and back
    ids = [f"i{i}" for i in range(200)]
    estimator = FrequencyEstimator(buckets=1 << 12, hashes=2, alpha=0.05)
    for probs in (before, after):
        stream = rng.choice(200, size=100_000, p=probs)
        for start in range(0, len(stream), 500):
            estimator.update([ids[i] for i in stream[start : start + 500]])
    recent_exact = np.bincount(stream[-50_000:], minlength=200) / 50_000
    estimate = estimator.probability(ids)
    # The items that became popular are estimated at their new share...
    new_top = np.argsort(-recent_exact)[:10]
    assert np.all(np.abs(estimate[new_top] - recent_exact[new_top]) / recent_exact[new_top] < 0.3)
    # ...and the old favourite has fallen to its new (tiny) share.
    assert estimate[0] < 5 * recent_exact[0] + 1e-4
    assert estimate[199] > 10 * estimate[0]


def test_state_round_trips(tmp_path):
    estimator = FrequencyEstimator(buckets=128, hashes=2, alpha=0.2)
    estimator.update(["a", "b", "a", "c"] * 10)
    estimator.save(tmp_path / "freq.npz")
    loaded = FrequencyEstimator.load(tmp_path / "freq.npz")
    assert loaded.step == estimator.step
    assert loaded.probability(["a", "b", "c"]).tolist() == estimator.probability(["a", "b", "c"]).tolist()
    with pytest.raises(ValueError):
        FrequencyEstimator(hashes=9)
