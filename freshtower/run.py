"""``freshtower run``: the whole learning loop on the embedded default.

Today this runs the learning core without Kafka: the simulator writes the
batches that the streams worker will cut from Kafka, the daily full trainer
trains each day but the last (warm start, shuffled, one epoch), and the
online trainer follows the last day hour by hour; after each hour the next
hour's clicks measure Recall@50 of the frozen daily model and of the online
one. The summary is the gain from fresh user embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from freshtower.config import Settings
from freshtower.simulator import Simulator, SimulatorConfig
from streams.batches import list_batches
from trainer.artifacts import full_models_dir, latest_full_model, load_full_model
from trainer.evaluation import evaluate, holdout_between
from trainer.full import train_full
from trainer.online import OnlineTrainer

HOUR_MS = 3_600_000


@dataclass
class HourResult:
    hour: int
    users: int
    frozen_recall: float
    online_recall: float


def run_offline(settings: Settings, simulator: Simulator, days: int, report=print) -> list[HourResult]:
    """Simulate ``days`` days, train full on all but the last, follow the
    last one online, and return next-hour Recall@50 per hour."""
    if days < 2:
        raise ValueError("need at least two days: one to train the full model on, one to follow online")
    existing = list_batches(settings.batches_dir)
    if existing:
        raise FileExistsError(f"{settings.batches_dir} already holds batches; point FRESHTOWER_DATA_DIR at an empty directory")
    for day in range(days):
        refs = simulator.write_batches(settings.batches_dir, day, settings.streams.window_seconds)
        report(f"simulated {simulator.day_name(day)}: {len(refs)} batches, {sum(r.manifest.positives for r in refs):,} clicks")
    for day in range(days - 1):
        result = train_full(settings, simulator.day_name(day))
        recall = result.metrics.get("exact", {}).get("recall@50", float("nan"))
        report(f"full model {result.ref.version}: {result.samples:,} samples, {result.samples_per_second:,.0f}/s, holdout Recall@50 {recall:.4f}")

    frozen = load_full_model(latest_full_model(full_models_dir(settings))).model
    online = OnlineTrainer.start(settings)
    refs = list_batches(settings.batches_dir)
    last_day = simulator.day_start_ms(days - 1)
    for ref in online.pending():
        if ref.window_start_ms < last_day:
            online.learn_batch(ref)  # catch up from the full model's data end
    results = []
    for hour in range(23):
        for ref in refs:
            if last_day + hour * HOUR_MS <= ref.window_start_ms < last_day + (hour + 1) * HOUR_MS:
                online.learn_batch(ref)
        holdout = holdout_between(refs, online.spec, last_day + (hour + 1) * HOUR_MS, last_day + (hour + 2) * HOUR_MS)
        if len(holdout) == 0:
            continue
        row = HourResult(
            hour + 1,
            len(holdout),
            evaluate(frozen, holdout, (50,), None)["exact"]["recall@50"],
            evaluate(online.model, holdout, (50,), None)["exact"]["recall@50"],
        )
        results.append(row)
        report(f"hour {row.hour:2d}: {row.users:4d} users, next-hour Recall@50 frozen {row.frozen_recall:.4f}, online {row.online_recall:.4f}")
    online.checkpoint()
    stats = online.stats
    weights = np.array([r.users for r in results], dtype=float)
    if len(results):
        frozen_mean = float(np.average([r.frozen_recall for r in results], weights=weights))
        online_mean = float(np.average([r.online_recall for r in results], weights=weights))
        report(
            f"summary: next-hour Recall@50 over {len(results)} hours: frozen daily model {frozen_mean:.4f}, "
            f"daily + online user embeddings {online_mean:.4f}; online trainer {stats.batches} batches, "
            f"{stats.samples:,} samples ({stats.samples / max(stats.train_seconds, 1e-9):,.0f}/s)"
        )
    return results


def default_simulator(seed: int = 0) -> Simulator:
    return Simulator(SimulatorConfig(seed=seed))
