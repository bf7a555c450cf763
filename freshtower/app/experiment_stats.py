"""The experiment's statistics: pure functions over per-seed or per-unit figures.

- ``t_interval``: the mean of a few per-seed figures and its two-sided
  Student-t confidence interval (seeds are independent worlds).
- ``paired_difference``: arm A minus arm B seed by seed (both arms replay
  each seed's world), then ``t_interval`` over those differences; pairing
  takes out the variation between worlds that both arms share.
- ``bootstrap_interval``: a percentile bootstrap over units (users, for one
  data set where seeds do not apply), optionally paired (the same resample
  for both arms).

No scipy: the t quantiles come from a small table (two-sided 95%), others
by a series.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Two-sided 95% Student-t quantiles (t_{0.975, df}), df 1..30; beyond 30 the normal's 1.96 is within 2%.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% confidence interval over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int
    method: str  # "t" (Student-t over seeds), "bootstrap" (percentile, over units) or "-" (one value)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 4) -> str:
        """``0.4123 ± 0.0101`` (the half-width; just the mean for one value).

        >>> Interval(0.41234, 0.40224, 0.42244, 5, "t").format()
        '0.4123 ± 0.0101'
        """
        if self.n < 2 or math.isnan(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_quantile_975(df: int) -> float:
    """The two-sided 95% Student-t quantile for ``df`` degrees of freedom.

    >>> t_quantile_975(4), t_quantile_975(1000)
    (2.776, 1.96)
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% Student-t interval: mean ± t(n-1) * sd / sqrt(n).

    >>> i = t_interval([1.0, 2.0, 3.0])
    >>> round(i.mean, 3), round(i.low, 3), round(i.high, 3)
    (2.0, -0.484, 4.484)
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "-")
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, math.nan, math.nan, 1, "-")
    half = t_quantile_975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x), "t")


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Interval:
    """``a - b`` seed by seed, with its t-interval over seeds (``a`` and
    ``b`` in the same seed order).

    >>> d = paired_difference([0.50, 0.52, 0.49], [0.40, 0.43, 0.38])
    >>> round(d.mean, 4), d.excludes_zero()
    (0.1, True)
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} against {len(b)}")
    return t_interval(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


def bootstrap_interval(
    values: Sequence[float],
    groups: Sequence[object] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> Interval:
    """``sum(values) / sum(weights)`` (the mean where ``weights`` is None)
    and its 95% percentile-bootstrap interval, resampling whole ``groups``
    (e.g. users: their units are not independent) or single values when
    ``groups`` is None. With weights it is a ratio, e.g. hits over clicks."""
    x = np.asarray(values, dtype=np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(x) == 0 or w.sum() == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "-")
    sums, counts = _group_sums(x, w, groups)
    means = _bootstrap_means(sums, counts, resamples, seed)
    means = means[~np.isnan(means)]
    return Interval(float(x.sum() / w.sum()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)), len(sums), "bootstrap")


def paired_bootstrap_difference(
    a: Sequence[float],
    b: Sequence[float],
    groups: Sequence[object] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> Interval:
    """``mean(a) - mean(b)`` over the same units (or the difference of the two ratios over the same ``weights``),
    resampled together by group."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same units: {len(a)} against {len(b)}")
    return bootstrap_interval(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), groups, resamples, seed, weights)


def _group_sums(x: np.ndarray, w: np.ndarray, groups: Sequence[object] | None) -> tuple[np.ndarray, np.ndarray]:
    if groups is None:
        return x, w
    if len(groups) != len(x):
        raise ValueError(f"one group per value: {len(groups)} groups for {len(x)} values")
    _, index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return np.bincount(index, weights=x), np.bincount(index, weights=w)


def _bootstrap_means(sums: np.ndarray, counts: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 100):  # bounded memory: 100 resamples at a time
        picks = rng.integers(0, len(sums), size=(min(100, resamples - start), len(sums)))
        with np.errstate(invalid="ignore", divide="ignore"):
            means[start : start + len(picks)] = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    return means
