"""The experiment's figures as tables, ``results.json`` and a PNG.

A ``DataSetResult`` holds every world's arm results of one data set (one
list per seed). Its figures are intervals (``experiment_stats``): over
seeds by Student-t where there are seeds (``method="t"``), else a
percentile bootstrap over users (``"bootstrap"``). A *metric* is a
per-unit value with a weight: a unit's Recall@K (weight 1, all units or
those of new or returning users) or the hits among its clicks on items
born that day or older (weight: those clicks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from freshtower.app.experiment_arms import ArmResult
from freshtower.app.experiment_stats import (
    Interval,
    bootstrap_interval,
    paired_bootstrap_difference,
    paired_difference,
    t_interval,
)
from freshtower.core.eventtime import HOUR_MS

# The arm compared with daily-full in the difference rows.
DIFFERENCES = (("full+inc/1min", "daily-full"), ("full+inc/30min", "daily-full"))


@dataclass(frozen=True)
class Metric:
    kind: str  # "recall" or "click"
    k: int
    subset: bool | None = None  # recall: new users (True), returning (False), all (None); click: born that day (True) or older

    def per_unit(self, result: ArmResult) -> tuple[np.ndarray, np.ndarray]:
        """(values, weights) per unit; a unit outside the subset weighs 0."""
        if self.kind == "recall":
            values = np.array([s.recall[self.k] for s in result.scores])
            weights = np.ones(len(values)) if self.subset is None else np.array([u.new_user == self.subset for u in result.units], float)
            return values * weights, weights
        hits = [(s.new_item_hits if self.subset else s.old_item_hits)[self.k] for s in result.scores]
        clicks = [s.new_item_clicks if self.subset else s.old_item_clicks for s in result.scores]
        return np.array(hits, float), np.array(clicks, float)

    def value(self, result: ArmResult) -> float:
        values, weights = self.per_unit(result)
        return float(values.sum() / weights.sum()) if weights.sum() else math.nan


@dataclass
class DataSetResult:
    label: str
    ks: tuple[int, int]
    by_seed: list[list[ArmResult]]  # per seed, every arm's result (the same arm order in each)
    method: str  # "t" over seeds or "bootstrap" over users
    resamples: int = 1000

    @property
    def arms(self) -> list[str]:
        return [r.arm for r in self.by_seed[0]]

    def results_of(self, arm: str) -> list[ArmResult]:
        return [next(r for r in seed if r.arm == arm) for seed in self.by_seed]

    def interval(self, arm: str, metric: Metric) -> Interval:
        results = self.results_of(arm)
        if self.method == "t":
            return t_interval([metric.value(r) for r in results])
        values, weights = metric.per_unit(results[0])
        return bootstrap_interval(values, [u.user_id for u in results[0].units], self.resamples, weights=weights)

    def difference(self, a: str, b: str, metric: Metric) -> Interval:
        ra, rb = self.results_of(a), self.results_of(b)
        if self.method == "t":
            return paired_difference([metric.value(r) for r in ra], [metric.value(r) for r in rb])
        (va, w), (vb, _) = metric.per_unit(ra[0]), metric.per_unit(rb[0])
        return paired_bootstrap_difference(va, vb, [u.user_id for u in ra[0].units], self.resamples, weights=w)

    def mean_over_seeds(self, arm: str, figure) -> float:
        values = [figure(r) for r in self.results_of(arm)]
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    @property
    def n(self) -> str:
        return f"{len(self.by_seed)} seeds" if self.method == "t" else f"{len(set(u.user_id for u in self.by_seed[0][0].units)):,} users"


def format_tables(results: list[DataSetResult]) -> str:
    """Two Markdown tables: quality and freshness, then the cold-start split; mean ± the 95% interval's half-width."""
    lines = []
    for data in results:
        k1, k2 = data.ks
        how = "Student-t over seeds, paired by seed for differences" if data.method == "t" else "bootstrap over users, paired"
        lines += [f"**{data.label}** ({data.n}; ± = half-width of the 95% interval, {how})", ""]
        lines += [
            f"| arm | next-hour Recall@{k1} | next-hour Recall@{k2} | freshness p50 | freshness p99 | units |",
            "|---|---|---|---|---|---|",
        ]
        for arm in data.arms:
            baseline = data.results_of(arm)[0].baseline
            fresh = ("-", "-")
            if not baseline:
                fresh = tuple(_duration(data.mean_over_seeds(arm, lambda r, q=q: r.freshness_percentile(q))) for q in (50, 99))
            units = data.mean_over_seeds(arm, lambda r: r.unit_count)
            lines.append(
                f"| {arm} | {data.interval(arm, Metric('recall', k1)).format()} | {data.interval(arm, Metric('recall', k2)).format()} | "
                f"{fresh[0]} | {fresh[1]} | {units:,.0f} |"
            )
        for a, b in DIFFERENCES:
            if a in data.arms and b in data.arms:
                d1, d2 = data.difference(a, b, Metric("recall", k1)), data.difference(a, b, Metric("recall", k2))
                lines.append(f"| **{a} − {b}** | {_marked(d1)} | {_marked(d2)} | | | |")
        lines += ["", f"| arm | Recall@{k1} new users | Recall@{k1} returning | clicks on items born that day found in top {k1} | "
                  f"older items found in top {k1} | new-user units | clicks on items born that day |", "|---|---|---|---|---|---|---|"]
        for arm in data.arms:
            new, old = Metric("recall", k1, True), Metric("recall", k1, False)
            born, older = Metric("click", k1, True), Metric("click", k1, False)
            new_units = data.mean_over_seeds(arm, lambda r: sum(u.new_user for u in r.units))
            born_clicks = data.mean_over_seeds(arm, lambda r: sum(s.new_item_clicks for s in r.scores))
            cells = " | ".join(data.interval(arm, m).format() for m in (new, old, born, older))
            lines.append(f"| {arm} | {cells} | {new_units:,.0f} | {born_clicks:,.0f} |")
        for a, b in DIFFERENCES[:1]:
            if a in data.arms and b in data.arms:
                cells = [_marked(data.difference(a, b, m)) for m in (Metric("recall", k1, True), Metric("recall", k1, False),
                                                                     Metric("click", k1, True), Metric("click", k1, False))]
                lines.append(f"| **{a} − {b}** | " + " | ".join(cells) + " | | |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _marked(interval: Interval) -> str:
    """A difference with its interval; a star where the interval excludes zero."""
    text = f"{interval.mean:+.4f} ± {interval.half_width:.4f}" if interval.n >= 2 else f"{interval.mean:+.4f}"
    return text + (" *" if interval.n >= 2 and interval.excludes_zero() else "")


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _interval_json(i: Interval) -> dict:
    return {"mean": i.mean, "low": i.low, "high": i.high, "n": i.n, "method": i.method}


def results_json(results: list[DataSetResult], options, seconds: float) -> dict:
    """Plain numbers for results.json: every interval, every seed's figures and the hourly curves."""
    data_sets = []
    for data in results:
        k1, k2 = data.ks
        metrics = {
            f"recall@{k1}": Metric("recall", k1), f"recall@{k2}": Metric("recall", k2),
            f"recall@{k1}/new-users": Metric("recall", k1, True), f"recall@{k1}/returning": Metric("recall", k1, False),
            f"click-recall@{k1}/born-that-day": Metric("click", k1, True), f"click-recall@{k1}/older": Metric("click", k1, False),
        }
        arms = {}
        for arm in data.arms:
            arms[arm] = {
                "intervals": {name: _interval_json(data.interval(arm, m)) for name, m in metrics.items()},
                "per_seed": [
                    {name: m.value(r) for name, m in metrics.items()}
                    | {"units": r.unit_count, "freshness_p50_s": r.freshness_percentile(50), "freshness_p99_s": r.freshness_percentile(99)}
                    for r in data.results_of(arm)
                ],
                "hourly": [r.hourly(k1) for r in data.results_of(arm)],
            }
        differences = {
            f"{a} - {b}": {name: _interval_json(data.difference(a, b, m)) for name, m in metrics.items()}
            for a, b in DIFFERENCES
            if a in data.arms and b in data.arms
        }
        data_sets.append({"data": data.label, "ks": list(data.ks), "method": data.method, "worlds": len(data.by_seed),
                          "arms": arms, "differences": differences})
    return {"seconds": seconds, "through": options.through, "exclude_seen": options.exclude_seen,
            "new_item_vectors": options.new_item_vectors, "data_sets": data_sets}


def hourly_band(data: DataSetResult, arm: str, window: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hours since the first scored hour, mean, low, high) of Recall@K1 as a ``window``-hour rolling mean: the band is
    the t-interval over seeds, or (one world) mean ± 1.96 standard errors of the units in the window."""
    k = data.ks[0]
    results = data.results_of(arm)
    first = min(u.hour_ms for r in results for u in r.units)
    last = max(u.hour_ms for r in results for u in r.units)
    hours = (last - first) // HOUR_MS + 1
    sums, counts, squares = (np.zeros((len(results), hours)) for _ in range(3))
    for n, r in enumerate(results):
        for score, unit in zip(r.scores, r.units):
            h = (unit.hour_ms - first) // HOUR_MS
            sums[n, h] += score.recall[k]
            squares[n, h] += score.recall[k] ** 2
            counts[n, h] += 1
    kernel = np.ones(min(window, hours))
    roll = lambda a: np.array([np.convolve(row, kernel, mode="valid") for row in a])  # noqa: E731
    s, c, q = roll(sums), roll(counts), roll(squares)
    x = np.arange(len(kernel) - 1, hours, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = s / c
        if len(results) >= 2:
            intervals = [t_interval(means[:, j]) for j in range(means.shape[1])]
            return x, np.array([i.mean for i in intervals]), np.array([i.low for i in intervals]), np.array([i.high for i in intervals])
        sd = np.sqrt(np.maximum(q[0] / c[0] - means[0] ** 2, 0))
        half = 1.96 * sd / np.sqrt(c[0])
        return x, means[0], means[0] - half, means[0] + half


def plot(results: list[DataSetResult], path) -> object:
    """Recall@K1 over time per arm with its band, one panel per data set (PNG). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(len(results), 1, figsize=(11, 4 * len(results)), squeeze=False)
    for axis, data in zip(axes[:, 0], results):
        for arm in data.arms:
            if not any(r.units for r in data.results_of(arm)):
                continue
            x, mean, low, high = hourly_band(data, arm)
            style = "--" if data.results_of(arm)[0].baseline else "-"
            (line,) = axis.plot(x, mean, style, label=arm)
            axis.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        band = "95% t-interval over seeds" if data.method == "t" else "±1.96 standard errors over units"
        axis.set_title(f"{data.label}: next-hour Recall@{data.ks[0]} (24-hour rolling mean; band: {band})")
        axis.set_xlabel("hours since the first scored hour")
        axis.set_ylabel(f"Recall@{data.ks[0]}")
        axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
