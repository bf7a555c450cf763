from __future__ import annotations

import numpy as np
import pytest

from freshtower.core.fingerprints import fingerprint_strings
from freshtower.core.frequency import FrequencyEstimator


def sequential_reference(estimator: FrequencyEstimator, item_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The paper's rule, one occurrence at a time (the oracle for the
    vectorised update); a cell's first occurrence only starts its clock."""
    last = estimator.last_step.copy()
    gap = estimator.gap.copy()
    seen = estimator.sightings.copy()
    buckets = estimator._buckets(fingerprint_strings(item_ids))
    step = estimator.step
    for n in range(len(item_ids)):
        step += 1
        for h in range(estimator.hashes):
            b = buckets[h, n]
            if seen[h, b]:
                gap[h, b] = (1 - estimator.alpha) * gap[h, b] + estimator.alpha * (step - last[h, b])
            last[h, b] = step
            seen[h, b] += 1
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
    print(f"steady stream, top 50 items: median relative error {np.median(relative_error):.3f}, max {relative_error.max():.3f}")
    assert np.median(relative_error) < 0.08
    assert relative_error.max() < 0.3
    assert estimator.probability(["never-seen"])[0] == 0.0


def test_an_item_first_seen_mid_stream_is_estimated_at_its_share_after_100_sightings():
    # 800,000 steps of a steady 500-item stream, then 10 new items at a share
    # of 0.01 each. Each new item's estimate is read just after its 100th
    # sighting: 99 gaps of mean 100 steps, so the moving average (alpha
    # 0.01, debiased) reads ~0.01 with ~10% noise. The paper's rule would
    # take the first gap as ~800,000 steps and read ~2e-4 (48x too low).
    rng = np.random.default_rng(5)
    p = zipf_probabilities(500)
    ids = np.array([f"i{i}" for i in range(500)] + [f"new{k}" for k in range(10)])
    estimator = FrequencyEstimator(buckets=1 << 14, hashes=2, alpha=0.01)
    steady = rng.choice(500, size=800_000, p=p)
    for start in range(0, len(steady), 20_000):
        estimator.update(ids[steady[start : start + 20_000]].tolist())
    mixed = rng.choice(510, size=150_000, p=np.concatenate([0.9 * p, np.full(10, 0.01)]))
    hundredth = sorted((np.flatnonzero(mixed == 500 + k)[99], k) for k in range(10))
    done, ratios = 0, np.zeros(10)
    for position, k in hundredth:
        estimator.update(ids[mixed[done : position + 1]].tolist())
        done = position + 1
        ratios[k] = estimator.probability([f"new{k}"])[0] / 0.01
    print(f"new items after 100 sightings: estimate / share {np.round(ratios, 3).tolist()}")
    assert np.median(np.abs(ratios - 1)) < 0.1
    assert np.mean(np.abs(ratios - 1) < 0.2) >= 0.8  # ~1 in 10 falls outside 20% by chance (seeded)
    assert np.all(np.abs(ratios - 1) < 0.35)


def test_one_sighting_gives_no_estimate_and_the_second_gives_the_gap():
    estimator = FrequencyEstimator(buckets=1 << 16, hashes=2, alpha=0.01)  # 11 items: no collisions
    estimator.update([f"f{k % 10}" for k in range(500)])  # 500 steps of other items
    estimator.update(["new"])  # step 501: only starts the clock
    assert estimator.probability(["new"])[0] == 0.0
    estimator.update([f"f{k % 10}" for k in range(49)] + ["new"])  # seen again 50 steps later
    # one gap of 50, debiased by 1 - 0.99^1: exactly 50 steps -> 0.02
    assert estimator.probability(["new"])[0] == pytest.approx(0.02, rel=1e-9)


def test_resolution_is_one_over_the_smaller_of_steps_and_buckets():
    estimator = FrequencyEstimator(buckets=1 << 10, hashes=2)
    estimator.update([f"i{k}" for k in range(100)])
    assert estimator.resolution == 1 / 100  # a share below 1/100 needs a gap longer than the stream
    estimator.update([f"i{k % 100}" for k in range(5000)])
    assert estimator.resolution == 1 / 1024  # collisions: a cell carries ~1/buckets of the stream


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
