"""The experiment's intervals: coverage on draws whose truth is known, pairing, grouping."""

import math

import numpy as np
import pytest

from freshtower.app.experiment_stats import (
    bootstrap_interval,
    paired_bootstrap_difference,
    paired_difference,
    t_interval,
    t_quantile_975,
)


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        i = t_interval(rng.normal(0.3, 0.05, size=5))
        hits += i.low <= 0.3 <= i.high
    assert 0.935 <= hits / 4000 <= 0.965


def test_pairing_removes_the_shared_world_effect():
    rng = np.random.default_rng(1)
    world = rng.normal(0.4, 0.05, size=5)  # seeds differ a lot
    a, b = world + 0.02 + rng.normal(0, 0.002, 5), world + rng.normal(0, 0.002, 5)
    paired = paired_difference(a, b)
    unpaired_half = t_interval(a).half_width + t_interval(b).half_width
    assert paired.excludes_zero() and paired.low > 0
    assert paired.half_width < unpaired_half / 5
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_one_value_has_no_interval_and_nan_is_ignored():
    one = t_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.half_width) and one.format() == "0.5000"
    assert t_interval([0.4, math.nan, 0.6]).n == 2
    assert t_quantile_975(4) == 2.776 and t_quantile_975(100) == 1.96
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_bootstrap_resamples_whole_groups():
    rng = np.random.default_rng(2)
    # 40 users with 25 units each; a user's units share the user's level: units are not independent.
    levels = rng.normal(0.5, 0.2, size=40)
    values = np.repeat(levels, 25) + rng.normal(0, 0.01, size=1000)
    users = np.repeat(np.arange(40), 25)
    by_user = bootstrap_interval(values, users, resamples=2000)
    by_unit = bootstrap_interval(values, None, resamples=2000)
    assert by_user.n == 40 and by_unit.n == 1000
    assert by_user.half_width > 3 * by_unit.half_width  # ignoring the grouping would claim far too much
    assert by_user.low < values.mean() < by_user.high


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(3)
    base = rng.random(500)
    diff = paired_bootstrap_difference(base + 0.05, base, np.arange(500) // 5)
    assert abs(diff.mean - 0.05) < 1e-9 and diff.half_width < 1e-9
    with pytest.raises(ValueError, match="same units"):
        paired_bootstrap_difference([1.0], [1.0, 2.0])


def test_weighted_bootstrap_is_a_ratio_of_sums():
    hits, clicks = np.array([1.0, 0.0, 3.0, 2.0]), np.array([2.0, 1.0, 3.0, 4.0])
    ratio = bootstrap_interval(hits, ["a", "a", "b", "c"], weights=clicks, resamples=500)
    assert ratio.mean == 6 / 10 and ratio.n == 3 and 0 <= ratio.low <= ratio.mean <= ratio.high <= 1
