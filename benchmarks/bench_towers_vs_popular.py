"""Why the experiment's model arms trail the most-popular baseline: day 0's
full model of one simulated world, trained under variants of the training
settings, scored on the whole next day's clicks (Recall@K of each user's
clicks of day 1, the user's first record's features), beside two
model-free rankings from day 0's clicks: the most popular items, and the
most popular items of the user's two most-clicked categories on day 0
(what a model that had learnt each user's topics and the items'
popularity could reach).

    freshtower experiment --out /tmp/w --seeds 1 --days 2 --jobs 1     # one world's batches (or any batches dir)
    python benchmarks/bench_towers_vs_popular.py /tmp/w/simulator/seed-0/batches /tmp/towers default,bs256,noresample

Variants (joined with ``_`` in one name): ``default`` (the experiment's
settings), ``bsN`` (``training.batch_size``), ``noresample`` (positive
re-sampling off), ``nologq`` (logQ correction off), ``dlrX`` (the dense
layers' learning rate). Every model goes through ``train_full``, the daily
trainer's real code path; the scoring is ``trainer.evaluation.evaluate``.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
from freshtower.trainer.artifacts import load_full_model
from freshtower.trainer.evaluation import evaluate, holdout_between
from freshtower.trainer.full import train_full

from freshtower.app.experiment import experiment_settings
from freshtower.core.batches import FeatureSpec, SampleColumns, list_batches, read_batch
from freshtower.core.eventtime import DAY_MS, day_name, floor_ms
from freshtower.core.settings import Settings


def recall(ranked: list[str], clicked: set[str], k: int) -> float:
    return len(set(ranked[:k]) & clicked) / len(clicked)


def variant_training(training, name: str):
    update = {}
    if "noresample" in name:
        update["positive_resampling"] = training.positive_resampling.model_copy(update={"enabled": False})
    if "nologq" in name:
        update["negatives"] = training.negatives.model_copy(update={"logq_correction": False})
    if m := re.search(r"bs(\d+)", name):
        update["batch_size"] = int(m.group(1))
    if m := re.search(r"dlr([0-9.e-]+?)(?:_|$)", name):
        update["full_learning_rate"] = float(m.group(1))
    return training.model_copy(update=update)


def main(batches: Path, out: Path, variants: list[str]) -> None:
    base = experiment_settings(Settings())
    spec = FeatureSpec.from_model(base.model)
    refs = list_batches(batches)
    day0 = floor_ms(refs[0].window_start_ms, DAY_MS)
    holdout = holdout_between(refs, spec, day0 + DAY_MS, day0 + 2 * DAY_MS)
    cols = SampleColumns.concat([read_batch(r, spec) for r in refs if r.window_start_ms < day0 + DAY_MS], spec)
    clicked = cols.labels == 1
    users, items = np.asarray(cols.user_ids, dtype=object)[clicked], np.asarray(cols.item_ids, dtype=object)[clicked]
    ids, counts = np.unique(items, return_counts=True)
    by_count = [ids[i] for i in np.argsort(-counts, kind="stable")]
    category = dict(zip(np.asarray(cols.item_ids, dtype=object), cols.item_categorical["category"]))
    by_category: dict[str, list[str]] = {}
    for item in by_count:
        by_category.setdefault(category[item], []).append(item)
    history: dict[str, dict[str, int]] = {}
    for user, item in zip(users, items):
        seen = history.setdefault(user, {})
        seen[category[item]] = seen.get(category[item], 0) + 1
    ks = (50, 200)
    popular = {k: np.mean([recall(by_count, c, k) for c in holdout.clicked]) for k in ks}
    topical = {k: [] for k in ks}
    for user, c in zip(holdout.user_ids, holdout.clicked):
        top = sorted(history.get(user, {}), key=lambda x: -history[user][x])[:2]
        ranked = [x for pair in zip(*(by_category[t][:200] for t in top)) for x in pair] if len(top) == 2 else (
            by_category[top[0]] if top else by_count)
        for k in ks:
            topical[k].append(recall(ranked, c, k))
    print(f"day 1: {len(holdout):,} users, {holdout.clicks:,} clicks; day 0: {int(clicked.sum()):,} clicks")
    print(f"| ranking | Recall@50 | Recall@200 |\n|---|---|---|")
    print(f"| most popular of day 0 | {popular[50]:.4f} | {popular[200]:.4f} |")
    print(f"| most popular of the user's two day-0 categories | {np.mean(topical[50]):.4f} | {np.mean(topical[200]):.4f} |", flush=True)
    for name in variants:
        settings = base.model_copy(update={"data_dir": out / name, "training": variant_training(base.training, name)})
        (out / name).mkdir(parents=True, exist_ok=True)
        if not (out / name / "batches").exists():
            (out / name / "batches").symlink_to(batches.resolve(), target_is_directory=True)
        started = time.perf_counter()
        result = train_full(settings, day_name(day0), from_scratch=True)
        metrics = evaluate(load_full_model(result.ref).model, holdout, ks, None)["exact"]
        steps = -(-result.samples // settings.training.batch_size)
        print(f"| model `{name}` ({steps} steps, {time.perf_counter() - started:.0f} s) | {metrics['recall@50']:.4f} | "
              f"{metrics['recall@200']:.4f} |", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","))
