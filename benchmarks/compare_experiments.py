"""Two `freshtower experiment` runs of the same seeds, compared seed by seed.

    python benchmarks/compare_experiments.py BEFORE/results.json AFTER/results.json

For each model arm and metric: each run's mean with its 95% t-interval over
seeds, and the paired difference AFTER - BEFORE (seed by seed: the runs share
each seed's world), starred where its interval excludes zero. Also each run's
own full+inc/1min - daily-full difference. Only the seeds both runs finished
are compared (``<out>/simulator/results-so-far.json`` of an unfinished run works too).
"""

from __future__ import annotations

import json
import sys

from freshtower.app.experiment_stats import paired_difference, t_interval

METRICS = [
    "recall@50",
    "recall@200",
    "recall@50/new-users",
    "recall@50/returning",
    "click-recall@50/born-that-day",
    "click-recall@50/older",
]
ARMS = ["daily-full", "full+inc/1min", "popular/day"]


def arms(path: str) -> dict:
    return json.load(open(path))["data_sets"][0]["arms"]


def main(before_path: str, after_path: str) -> None:
    before, after = arms(before_path), arms(after_path)
    for arm in ARMS:
        b_seeds, a_seeds = before[arm]["per_seed"], after[arm]["per_seed"]
        n = min(len(b_seeds), len(a_seeds))
        print(f"\n{arm}, {n} seeds\n\n| metric | before | after | after - before, paired |\n|---|---|---|---|")
        for metric in METRICS:
            b = [s[metric] for s in b_seeds[:n]]
            a = [s[metric] for s in a_seeds[:n]]
            d = paired_difference(a, b)
            star = " *" if d.excludes_zero() else ""
            print(f"| {metric} | {t_interval(b).format()} | {t_interval(a).format()} | {d.format()}{star} |")
    for name, run in (("before", before), ("after", after)):
        daily, online = run["daily-full"]["per_seed"], run["full+inc/1min"]["per_seed"]
        d = paired_difference([s["recall@50"] for s in online], [s["recall@50"] for s in daily])
        print(f"\n{name}: full+inc/1min - daily-full, Recall@50, paired over {d.n} seeds: {d.format()}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
