"""``freshtower prerank-experiment``: pre-ranking quality against the ranker
and against clicks, over seeds.

Per seed: a simulated world's first two days go through the streams join
and sink in process (``JoinCore`` and ``BatchSink``, the worker's code
without Kafka), so the ranking samples and statistics are the stream's.
On day 0 the retrieval model is trained (``train_full``) and the
pre-ranker arms (``train_prerank_full``); every arm scores every ranking
sample of day 1, which none learnt:

- ``three-tower, clicks + distillation``: the default objective;
- ``three-tower, clicks only``: ``distill_weight = 0``;
- ``three-tower, distillation only``: ``click_weight = 0``;
- ``two-tower as pre-ranker``: the retrieval model's cosine of user and
  candidate, trained on clicks (``distillation.retrieval_weight = 0``) and
  ``..., distilled`` (``retrieval_weight = 1``).

The two retrieval models are also scored on retrieval: next-hour
Recall@K (day 1's first hour, exact search over the catalogue), with the
paired difference distilled minus clicks-only per seed.

Figures per arm (``trainer/prerank_metrics.py``): the ranker's top
``top_k`` recalled in the arm's top ``keep``, NDCG@``keep`` against the
ranker's scores, click AUC within request; mean and a 95% t-interval over
the seeds.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from freshtower.streams.join import JoinCore, JoinSettings, RawEvent
from freshtower.streams.ranking_samples import RankingSampleEmitter
from freshtower.streams.sink import BatchSink
from freshtower.trainer.artifacts import full_models_dir, latest_full_model, load_full_model
from freshtower.trainer.full import train_full
from freshtower.trainer.prerank_full import evaluate_preranker, item_statistics_for, load_preranker, prepare, train_prerank_full
from freshtower.trainer.prerank_metrics import prerank_quality

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.batches import FeatureSpec, list_batches
from freshtower.core.frequency import FrequencyEstimator
from freshtower.core.settings import Settings, load_settings

ARMS = {
    "three-tower, clicks + distillation": {"click_weight": 1.0, "distill_weight": 1.0},
    "three-tower, clicks only": {"click_weight": 1.0, "distill_weight": 0.0},
    "three-tower, distillation only": {"click_weight": 0.0, "distill_weight": 1.0},
}
TWO_TOWER = "two-tower as pre-ranker"
# The two-tower retrieval model with and without distillation (DistillationConfig)
RETRIEVAL_ARMS = {
    "two-tower, clicks": {"retrieval_weight": 0.0},
    "two-tower, clicks + distillation": {"retrieval_weight": 1.0},
}
RETRIEVAL_HOLDOUT_SECONDS = 3600.0  # next-hour Recall@K: the next day's first hour, which day 0's model has not learnt


@dataclass
class PrerankExperimentResult:
    top_k: int
    keep: int
    seeds: list[int]
    per_seed: dict[str, list[dict]] = field(default_factory=dict)  # arm -> metrics per seed
    retrieval: dict[str, list[dict]] = field(default_factory=dict)  # retrieval arm -> next-hour recall@K per seed

    def table(self) -> list[str]:
        keys = [f"ranker_top{self.top_k}_in_top{self.keep}", f"ndcg@{self.keep}", "click_auc"]
        lines = ["| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for arm, runs in self.per_seed.items():
            cells = [interval([r[k] for r in runs]) for k in keys]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        return lines

    def retrieval_table(self) -> list[str]:
        """Next-hour Recall@K per retrieval arm and the paired difference
        (distilled minus clicks only, seed by seed), 95% t-intervals."""
        if not self.retrieval:
            return []
        keys = sorted({k for runs in self.retrieval.values() for r in runs for k in r if k.startswith("recall@")},
                      key=lambda k: int(k.split("@")[1]))
        lines = ["| arm | " + " | ".join(f"next-hour {k}" for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for arm, runs in self.retrieval.items():
            lines.append(f"| {arm} | " + " | ".join(interval([r.get(k, math.nan) for r in runs]) for k in keys) + " |")
        arms = list(self.retrieval)
        if len(arms) == 2:
            plain, distilled = self.retrieval[arms[0]], self.retrieval[arms[1]]
            cells = [interval([d.get(k, math.nan) - p.get(k, math.nan) for p, d in zip(plain, distilled)]) for k in keys]
            lines.append("| paired difference (distilled - clicks) | " + " | ".join(cells) + " |")
        return lines


def interval(values: list[float]) -> str:
    """Mean ± half-width of the 95% t-interval over seeds."""
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.4f}"
    half = t95.get(len(values), 2.0) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return f"{mean:.4f} ± {half:.4f}"


def stream_days(simulator: Simulator, days: list[int], batches_dir: Path, settings: Settings) -> None:
    """The simulator's events through one partition's join and sink, every window closed."""
    join = JoinSettings.from_config(settings.streams)
    f = settings.frequency
    sink = BatchSink(batches_dir, "experiment", FrequencyEstimator(f.buckets, f.hashes, f.alpha), partition=0,
                     emitter=RankingSampleEmitter(settings.prerank.category_feature, settings.prerank.teacher_stage, join.join_window_ms))
    core = JoinCore(join, {}, partition=0)

    pending = []
    for day in days:
        for topic, event in simulator.events(day):
            pending.append(RawEvent(topic, 0, len(pending), event["user_id"].encode(), json.dumps(event).encode()))
            if len(pending) >= 1000:
                _feed(core, sink, pending)
                pending = []
    _feed(core, sink, pending)
    for window in core.advance(simulator.day_start_ms(max(days) + 1) + 2 * join.join_window_ms).closed:
        sink.write(window)
    core.finalize()


def _feed(core: JoinCore, sink: BatchSink, messages: list) -> None:
    if not messages:
        return
    now = json.loads(messages[-1].value)["ts"]
    for window in core.process(messages, now_ms=now).closed:
        sink.write(window)
    core.finalize()


@torch.no_grad()
def two_tower_quality(settings: Settings, prepared) -> dict:
    loaded = load_full_model(latest_full_model(full_models_dir(settings)))
    model = loaded.model.eval()
    c = prepared.columns
    users = model.user_vectors(model.user_inputs(c.user_ids, c.user_categorical, c.user_numeric))
    items = model.item_vectors(model.item_inputs(c.candidate_ids, _item_categorical_for(model, c)))
    scores = (users[torch.from_numpy(c.request_of())] * items).sum(dim=1).numpy()
    p = settings.prerank
    return prerank_quality(scores, c.scores, c.clicked, c.shown, c.offsets, p.eval_top_k, p.eval_keep)


def _item_categorical_for(model, columns) -> dict[str, list[str]]:
    return {name: list(columns.categories) if name == "category" else [""] * columns.candidates for name in model.item_categorical}


def run_prerank_experiment(
    seeds: list[int], world: SimulatorConfig, overrides: dict | None = None, say: Callable[[str], None] = print,
    work_dir: Path | None = None,
) -> PrerankExperimentResult:
    overrides = dict(overrides or {})
    probe = load_settings(**overrides)
    result = PrerankExperimentResult(probe.prerank.eval_top_k, probe.prerank.eval_keep, list(seeds))
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix=f"prerank-exp-{seed}-", dir=work_dir) as root:
            sim = Simulator(SimulatorConfig(**{**world.__dict__, "seed": seed}))
            base = load_settings(data_dir=Path(root) / "base", **overrides)
            say(f"seed {seed}: streaming two days")
            stream_days(sim, [0, 1], base.batches_dir, base)
            day0, day1 = sim.day_name(0), sim.day_name(1)
            spec = FeatureSpec.from_model(base.model)
            refs = list_batches(base.batches_dir, day1)
            evaluation = prepare(base, refs, spec, item_statistics_for(base.batches_dir, refs))
            say(f"seed {seed}: {len(evaluation.columns):,} day-1 requests, {evaluation.columns.candidates:,} candidates to score")
            for arm, weights in ARMS.items():
                settings = load_settings(data_dir=base.data_dir, **{**overrides, "distillation": {**overrides.get("distillation", {}), **weights}})
                trained = train_prerank_full(settings, day0, from_scratch=True)
                metrics = evaluate_preranker(load_preranker(trained.ref).model, evaluation, settings)
                result.per_seed.setdefault(arm, []).append(metrics)
                say(f"seed {seed}: {arm}: {metrics}")
            for arm, weights in RETRIEVAL_ARMS.items():
                settings = load_settings(
                    data_dir=base.data_dir,
                    **{
                        **overrides,
                        "training": {**overrides.get("training", {}), "holdout_seconds": RETRIEVAL_HOLDOUT_SECONDS},
                        "distillation": {**overrides.get("distillation", {}), **weights},
                    },
                )
                trained = train_full(settings, day0, from_scratch=True)
                recall = {"clicks": trained.metrics.get("clicks", 0), **trained.metrics.get("exact", {})}
                result.retrieval.setdefault(arm, []).append(recall)
                name = TWO_TOWER if not weights["retrieval_weight"] else f"{TWO_TOWER}, distilled"
                metrics = two_tower_quality(settings, evaluation)  # the model just trained (the newest)
                result.per_seed.setdefault(name, []).append(metrics)
                say(f"seed {seed}: {arm}: next-hour {recall}; as pre-ranker {metrics}")
    return result

