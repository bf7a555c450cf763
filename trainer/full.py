"""The daily full trainer: all of one day's batches, shuffled globally, one
epoch, every parameter, warm-started from the previous full model.

Steps (``train_full``):

1. Warm start from the newest full model of an earlier day (random init
   only with ``from_scratch`` or when none exists), its row-wise Adagrad
   sums multiplied by ``accumulator_decay``; expire IDs and items unseen
   for ``expiry_days``.
2. Every batch of the day is training data: the model's ``data_end_ms`` is
   the end of the day's last batch, where the online trainer that forks
   from it starts.
3. Pass 1, in time order, one file at a time: fill the catalogue (clicked
   and shown records), count ID sightings, update the item-frequency
   estimator, and scatter the clicked samples at random over shard files
   (an external shuffle: memory holds one shard, never the day).
4. Pass 2: shards in random order, each permuted, cut into minibatches,
   learnt once.
5. Evaluate on the holdout, the first ``holdout_seconds`` of the next day
   (``holdout_batches``), which this model has not learnt; the parent model
   is scored on the same clicks. Write the versioned artifact.

The holdout is the quality gate's data (the publisher refuses a model whose
holdout Recall@50 drops too far): the next day's model and the online
trainer learn it, so no click is kept from training. The daily schedule
waits ``full_delay_seconds`` (default 900) after midnight, longer than the
default holdout of 600 s, so it is on disk when training starts; a model
trained before (or for the stream's last day) has an empty holdout.

A NaN or infinite loss raises ``NonFiniteLossError`` and nothing is written.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from freshtower.trainer.artifacts import (
    ArtifactError,
    FullModelRef,
    full_models_dir,
    latest_full_model,
    load_full_model,
    new_estimator,
    new_model,
    previous_full_model,
    save_full_model,
)
from freshtower.trainer.evaluation import evaluate, holdout_from_samples
from freshtower.trainer.learner import MS_PER_DAY, Learner, event_day
from freshtower.trainer.retrieval import IndexSettings
from freshtower.trainer.samplers import clicked_only
from freshtower.trainer.soft_labels import distillation_records, positive_spans, request_grouped_order
from freshtower.trainer.sparse_optim import reset_rows

from freshtower.core.batches import BatchRef, FeatureSpec, SampleColumns, list_batches, read_batch
from freshtower.core.contracts import LineageEntry, TrainingRecord
from freshtower.core.settings import Settings

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]  # (phase, done, total)


class NoBatchesError(FileNotFoundError):
    """The day has no complete batches to train on."""


@dataclass
class FullTrainingResult:
    ref: FullModelRef
    samples: int  # positives learnt (after re-sampling)
    train_seconds: float
    metrics: dict

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0


def holdout_batches(batches_dir: Path, day: str, seconds: float) -> tuple[int, int, list[BatchRef]]:
    """(start_ms, end_ms, batches) of day ``day``'s holdout: the batches of
    the next day whose windows start in its first ``seconds``.

    >>> holdout_batches(Path("/nonexistent"), "2026-11-20", 600)[:2]  # 2026-11-21 00:00 to 00:10 UTC
    (1795219200000, 1795219800000)
    """
    start_ms = (date.fromisoformat(day).toordinal() - date(1970, 1, 1).toordinal() + 1) * MS_PER_DAY
    end_ms = start_ms + int(seconds * 1000)
    next_day = date.fromordinal(date.fromisoformat(day).toordinal() + 1).isoformat()
    refs = list_batches(batches_dir, next_day) if Path(batches_dir, next_day).is_dir() else []
    return start_ms, end_ms, [r for r in refs if start_ms <= r.window_start_ms < end_ms]


def _optimizer_state(learner: Learner) -> dict:
    tables = []
    for table, vocab in learner.model.table_vocabularies():
        state = learner.table_optimizer.state.get(table, {})
        total = state.get("sum")
        tables.append(None if total is None else total[: len(vocab)].clone())
    return {"dense": learner.dense_optimizer.state_dict(), "tables": tables}


def _restore_optimizer_state(learner: Learner, saved: dict, accumulator_decay: float) -> None:
    """The parent's optimiser state, its row-wise Adagrad sums multiplied by
    ``accumulator_decay``: plain Adagrad sums only grow, so a row learnt for
    d days would step ~1/sqrt(d) as far and long-lived rows would freeze;
    decayed once a day they stay below ``1 / (1 - decay)`` days' worth."""
    if not saved:
        return
    learner.dense_optimizer.load_state_dict(saved["dense"])
    for (table, _), total in zip(learner.model.table_vocabularies(), saved["tables"]):
        if total is not None:
            padded = torch.zeros(table.shape[0], dtype=total.dtype)
            padded[: len(total)] = total * accumulator_decay
            learner.table_optimizer.state[table]["sum"] = padded


def _expire(learner: Learner, today: int, expiry_days: int) -> dict[str, int]:
    model = learner.model
    freed = {}
    for table, vocab in [(model.user_tower.id_embedding, model.user_ids), (model.item_tower.id_embedding, model.item_ids)]:
        rows = vocab.expire(today)
        reset_rows(table, torch.from_numpy(rows), learner.optimizers)
        freed[id(vocab)] = len(rows)
    before = len(model.catalogue)
    model.catalogue = model.catalogue.compact(today, expiry_days)
    return {"users": freed[id(model.user_ids)], "items": freed[id(model.item_ids)], "catalogue": before - len(model.catalogue)}


def train_full(
    settings: Settings,
    day: str,
    *,
    from_scratch: bool = False,
    progress: ProgressCallback | None = None,
    collective=None,
) -> FullTrainingResult | None:
    """Train the full model for ``day`` (YYYY-MM-DD) and write a new version.

    With a ``collective`` (``trainer.distributed``), this is one worker of a
    data-parallel run: it trains its share of the shards, and only worker 0
    evaluates and writes (the others return None)."""
    date.fromisoformat(day)
    refs = list_batches(settings.batches_dir, day)
    if not refs:
        raise NoBatchesError(f"no complete batches for {day} under {settings.batches_dir / day}")
    models_dir = full_models_dir(settings)
    spec = FeatureSpec.from_model(settings.model)
    training = settings.training
    if training.threads:
        torch.set_num_threads(training.threads)

    parent, model, estimator, saved_optimizer = _warm_start(settings, models_dir, day, from_scratch)
    seed = training.seed + date.fromisoformat(day).toordinal()
    rank, world = (collective.rank, collective.world) if collective else (0, 1)
    main = rank == 0
    if not main:
        progress = None
    learner = _start_learner(settings, model, estimator, saved_optimizer if parent is not None else None, seed + rank, collective)
    holdout_start_ms, holdout_end_ms, holdout_refs = holdout_batches(settings.batches_dir, day, training.holdout_seconds)
    holdout, parent_metrics = _holdout(settings, spec, model, parent, holdout_refs) if main else (None, None)
    today = date.fromisoformat(day).toordinal() - date(1970, 1, 1).toordinal()
    expired = _expire(learner, today, settings.vocabulary.expiry_days)

    samples, losses_seen, train_seconds, newest_click_ms = _train_day(learner, estimator, settings, day, refs, spec, seed, collective, progress)
    if collective:
        # The workers applied the same updates, so their replicas must be
        # bit-identical; if not, the run is wrong and nothing is written.
        collective.check_identical(model.parameters(), f"full training of {day}")
    if not main:
        return None

    metrics = _evaluate_day(settings, day, model, holdout, parent, parent_metrics)
    metrics.update(_training_figures(model, samples, train_seconds, losses_seen, expired, world))
    record = TrainingRecord(
        parent=parent.version if parent else None,
        from_scratch=parent is None,
        data_start_ms=refs[0].window_start_ms,
        data_end_ms=refs[-1].manifest.window_end_ms,  # the online trainer forks here: nothing skipped, nothing learnt twice
        newest_click_event_time_ms=newest_click_ms or None,  # freshness of a full release
        holdout_start_ms=holdout_start_ms,  # the next day's first holdout_seconds
        holdout_end_ms=holdout_end_ms,
        metrics=metrics,
        lineage=_lineage(settings, refs, holdout_refs),
        config=settings.as_record(),
    )
    ref = save_full_model(models_dir, day, model, estimator, _optimizer_state(learner), record)
    return FullTrainingResult(ref, samples, train_seconds, metrics)


def _start_learner(settings: Settings, model, estimator, saved_optimizer, seed: int, collective) -> Learner:
    """The day's learner over every parameter; ``saved_optimizer``: the
    parent's optimiser state to continue from (None: a fresh start)."""
    learner = Learner(model, settings.training, estimator, trainable="all", seed=seed, distillation=settings.distillation)
    learner.collective = collective
    learner.update_frequencies = False  # pass 1 follows the day in time order
    if saved_optimizer is not None:
        _restore_optimizer_state(learner, saved_optimizer, settings.training.accumulator_decay)
    return learner


def _evaluate_day(settings: Settings, day: str, model, holdout, parent, parent_metrics) -> dict:
    """Recall on the next day's first holdout_seconds, beside the parent's."""
    model.eval()
    if not len(holdout):
        log.warning("full model %s: no holdout clicks in the next day's first %.0f s (not written yet?)", day, settings.training.holdout_seconds)
    metrics = evaluate(model, holdout, settings.evaluation.ks, IndexSettings.from_publisher(settings.publisher))
    if parent_metrics is not None and "exact" in parent_metrics:
        metrics["parent"] = {"version": parent.version, "exact": parent_metrics["exact"]}
    return metrics


def _train_day(learner: Learner, estimator, settings: Settings, day: str, refs, spec, seed: int, collective, progress):
    """The day's two passes over every click (``refs``): scatter in time
    order into shuffle shards (this worker's share of them), then learn them
    shuffled. Returns (samples over all workers, losses, seconds, newest
    click's event time)."""
    training = settings.training
    rank, world = (collective.rank, collective.world) if collective else (0, 1)
    total_positives = sum(r.manifest.positives for r in refs)
    shards = training.shuffle_shards or max(1, math.ceil(total_positives / training.shuffle_shard_records))
    rng = np.random.default_rng(seed)  # the same on every worker: same shard assignment
    mine = [s for s in range(shards) if s % world == rank]
    scratch = Path(tempfile.mkdtemp(prefix=f"full-{day}-{rank}-pid{os.getpid()}-", dir=_scratch_root(settings)))
    try:
        shard_sizes, newest_click_ms = _scatter_in_time_order(
            learner, estimator, refs, spec, rng, shards, mine, scratch, progress, settings.prerank.category_feature
        )
        samples, losses_seen, train_seconds = _learn_shuffled(learner, day, spec, rng, shard_sizes, mine, scratch, collective, total_positives, progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if collective:
        samples = int(collective.all_reduce_sum(samples))
    return samples, losses_seen, train_seconds, newest_click_ms


def _training_figures(model, samples: int, train_seconds: float, losses_seen: list, expired, workers: int) -> dict:
    return {
        "train_samples": samples,
        "train_seconds": train_seconds,
        "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
        "mean_loss": float(np.mean(losses_seen)) if losses_seen else None,
        "final_loss": float(np.mean(losses_seen[-20:])) if losses_seen else None,
        "expired": expired,
        "workers": workers,
        "users": model.user_ids.admitted,
        "items": len(model.catalogue),
    }


def _warm_start(settings: Settings, models_dir: Path, day: str, from_scratch: bool):
    """(parent, model, estimator, saved optimiser state): the newest full
    model of an earlier day, or a random init."""
    parent = None if from_scratch else previous_full_model(models_dir, day)
    if parent is None:
        log.info("full training %s from random init (%s)", day, "requested" if from_scratch else "no earlier full model")
        return None, new_model(settings), new_estimator(settings), {}
    loaded = load_full_model(parent)
    if loaded.settings.model != settings.model:
        raise ArtifactError(f"model shape changed since {parent.version} ({parent.path}); retrain with --from-scratch")
    log.info("full training %s warm-started from %s", day, parent.version)
    return parent, loaded.model, loaded.estimator, loaded.optimizer_state


def _holdout(settings: Settings, spec: FeatureSpec, model, parent: FullModelRef | None, holdout_refs: list[BatchRef]):
    """The holdout clicks and, with a parent, the parent's metrics on them
    before it learns this day: the paired baseline for the gate."""
    holdout = holdout_from_samples(SampleColumns.concat([read_batch(r, spec) for r in holdout_refs], spec))
    if parent is None or not len(holdout):
        return holdout, None
    model.eval()
    parent_metrics = evaluate(model, holdout, settings.evaluation.ks, None)
    model.train()
    return holdout, parent_metrics


def _scatter_in_time_order(
    learner: Learner, estimator, refs, spec, rng, shards: int, mine: list[int], scratch: Path, progress, category_feature: str = "category"
):
    """Pass 1, in time order, one file at a time: the catalogue, ID
    sightings and the frequency estimator follow the day; the clicked
    samples are scattered at random over shard files (an external shuffle).
    Returns (samples per shard, newest click's event time)."""
    model = learner.model
    shard_sizes = np.zeros(shards, dtype=np.int64)
    newest_click_ms = 0
    shard_files = {s: open(scratch / f"shard-{s:04d}.pkl", "wb") for s in mine}
    try:
        for n, ref in enumerate(refs):
            records = read_batch(ref, spec, positives_only=False)
            file_day = event_day(ref.window_start_ms)
            model.catalogue.update(records.item_ids, records.item_categorical, file_day)
            positives = clicked_only(records)
            if len(positives):
                newest_click_ms = max(newest_click_ms, int(positives.event_time_ms.max()))
            learner.observe(positives, file_day)
            estimator.update(positives.item_ids)
            if learner.distillation is None:
                kept, assignment = positives, rng.integers(0, shards, size=len(positives))
            else:  # clicks and scored records (shown, or the ranking samples' candidates), whole requests to one shard
                kept = distillation_records(ref, spec, learner.distillation, category_feature, records)
                _, request_of = np.unique(np.asarray(kept.request_ids, dtype=object), return_inverse=True)
                assignment = rng.integers(0, shards, size=int(request_of.max()) + 1 if len(kept) else 0)[request_of.reshape(-1)]
            shard_sizes += np.bincount(assignment, weights=kept.labels == 1, minlength=shards).astype(np.int64)
            for s in mine:
                chosen = np.flatnonzero(assignment == s)
                if len(chosen):
                    pickle.dump(kept.take(chosen), shard_files[s], protocol=pickle.HIGHEST_PROTOCOL)
            if progress:
                progress("read", n + 1, len(refs))
    finally:
        for handle in shard_files.values():
            handle.close()
    return shard_sizes, newest_click_ms


def _learn_shuffled(
    learner: Learner, day: str, spec, rng, shard_sizes, mine: list[int], scratch: Path, collective, total_positives: int, progress
):
    """Pass 2: this worker's shards in random order, each permuted, cut into
    minibatches, learnt once. Data-parallel workers split the shards and the
    global batch; every step is a collective, so a worker that runs out of
    data keeps exchanging gradients until the others finish. Returns
    (samples learnt, losses, seconds)."""
    world = collective.world if collective else 1
    rank = collective.rank if collective else 0
    batch_size = max(1, learner.training.batch_size // world)
    order_of_shards = [s for s in rng.permutation(len(shard_sizes)).tolist() if s in mine]
    steps = int(sum(-(-int(shard_sizes[s]) // batch_size) for s in order_of_shards))
    total_steps = collective.all_reduce_max(steps) if collective else steps
    samples, done, losses_seen = 0, 0, []
    started = time.perf_counter()
    for s in order_of_shards:
        shard = _load_shard(scratch / f"shard-{s:04d}.pkl", spec)
        if learner.distillation is None:
            order = rng.permutation(len(shard))
            spans = [(start, start + batch_size) for start in range(0, len(order), batch_size)]
        else:  # requests in random order, kept whole; minibatches of batch_size clicks and the shown records among them
            order = request_grouped_order(shard.request_ids, rng)
            spans = positive_spans(shard.labels[order], batch_size)
        for n, (start, stop) in enumerate(spans):
            minibatch = shard.take(order[start:stop])
            result = learner.learn(minibatch, where=f"{day} shard {s} minibatch {n}", observe=False)
            samples += result.samples
            losses_seen.append(result.loss)
            done += int((minibatch.labels == 1).sum())
            if progress:
                progress("train", done * world, total_positives)
    for extra in range(total_steps - steps):
        learner.sync_only_step(where=f"{day} worker {rank} idle step {extra}")
    return samples, losses_seen, time.perf_counter() - started


def _lineage(settings: Settings, train_refs: list[BatchRef], holdout_refs: list[BatchRef]) -> list[LineageEntry]:
    return [
        LineageEntry(
            file=str(r.path.relative_to(settings.batches_dir)), sha256=r.manifest.sha256, positives=r.manifest.positives, role=role
        )
        for role, group in (("train", train_refs), ("holdout", holdout_refs))
        for r in group
    ]


def _parallel_worker(collective, settings: Settings, day: str, from_scratch: bool) -> None:
    train_full(settings, day, from_scratch=from_scratch, collective=collective)


def train_full_parallel(settings: Settings, day: str, workers: int, *, from_scratch: bool = False) -> FullModelRef:
    """Data-parallel full training in ``workers`` processes (gloo on
    127.0.0.1); returns the version worker 0 wrote."""
    from freshtower.trainer.distributed import launch

    before = latest_full_model(full_models_dir(settings))
    launch(workers, _parallel_worker, settings, day, from_scratch)
    after = latest_full_model(full_models_dir(settings))
    if after is None or (before is not None and after.version == before.version):
        raise RuntimeError(f"data-parallel full training of {day} wrote no model")
    return after


def _scratch_root(settings: Settings) -> Path:
    """The scratch directory, cleared of shard directories that a killed
    training (SIGKILL: its clean-up never ran) left behind: a day's shards
    are as large as the day's clicks, and each restart would leave more."""
    root = settings.scratch_dir
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob("full-*-pid*-*"):
        match = re.search(r"-pid(\d+)-", leftover.name)
        if match and leftover.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(leftover, ignore_errors=True)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_shard(path: Path, spec: FeatureSpec) -> SampleColumns:
    parts = []
    with open(path, "rb") as handle:
        while True:
            try:
                parts.append(pickle.load(handle))
            except EOFError:
                break
    return SampleColumns.concat(parts, spec)
