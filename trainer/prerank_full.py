"""The pre-ranker's daily training: yesterday's ranking samples, shuffled,
one epoch, warm-started from the previous pre-ranker, with the click loss
and/or the distillation loss on the ranker's logged scores
(``DistillationConfig``; ``trainer/distillation.py``).

Steps (``train_prerank_full``):

1. The day's ranking samples from every partition's batches
   (``read_ranking_samples``), their item statistics filled from every
   partition's statistics rows of the day and the day before
   (``statistics_counts``: as of each request's minute) and encoded as
   the cross tower's input (``encode_statistics``).
2. Warm start from the newest pre-ranker of an earlier day that was not
   refused (random init when there is none, or with ``from_scratch``); the
   day's users, items and feature values get rows (frequency filter and
   expiry of ``[vocabulary]``); the catalogue learns the candidates'
   categories.
3. Requests in a seeded random order, ``prerank.batch_requests`` per
   minibatch, every candidate of a request together (the listwise term
   needs them): Adam on the dense layers, row-wise Adagrad on the tables
   (fresh optimiser state each day).
4. Quality on the holdout, the next day's first
   ``training.holdout_seconds`` of ranking samples
   (``trainer/prerank_metrics.py``), for the new model and for its parent
   on the same requests: the publisher's gate compares the two.
5. Written as a version of ``models/prerank/`` (``<day>.<n>``, the same
   store and manifest contract as the full models; ``prerank.pt``).

A day without ranking samples (a stream without rank logs) trains nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from freshtower.trainer.artifacts import (
    ArtifactError,
    FullModelRef,
    check_model_version,
    full_model_store,
    latest_full_model,
    list_full_models,
    previous_full_model,
)
from freshtower.trainer.distillation import prerank_objective
from freshtower.trainer.full import holdout_batches
from freshtower.trainer.learner import MS_PER_DAY
from freshtower.trainer.losses import NonFiniteLossError
from freshtower.trainer.prerank_metrics import prerank_quality
from freshtower.trainer.prerank_model import ThreeTowerPreranker
from freshtower.trainer.sparse_optim import RowWiseAdagrad, reset_rows

from freshtower.core.batches import BatchRef, FeatureSpec, list_batches
from freshtower.core.batches.ranking import RankingColumns, read_ranking_samples, read_statistics_rows, statistics_counts
from freshtower.core.contracts import FullModelManifest, LineageEntry
from freshtower.core.settings import Settings, settings_from_record
from freshtower.core.statistics import ItemStatistics, encode_statistics, item_count_deltas
from freshtower.core.storage import FileDigest, write_file

log = logging.getLogger(__name__)

WEIGHTS = "prerank.pt"
WEIGHTS_FORMAT = 1


@dataclass
class PrerankTrainingResult:
    ref: FullModelRef
    requests: int
    candidates: int
    train_seconds: float
    metrics: dict


@dataclass
class LoadedPreranker:
    ref: FullModelRef
    settings: Settings  # as resolved when it was trained
    model: ThreeTowerPreranker


def prerank_models_dir(settings: Settings) -> Path:
    return settings.models_dir / "prerank"


def new_preranker(settings: Settings) -> ThreeTowerPreranker:
    torch.manual_seed(settings.training.seed)
    return ThreeTowerPreranker(settings.model, settings.prerank, settings.vocabulary)


def latest_preranker(settings: Settings) -> FullModelRef | None:
    directory = prerank_models_dir(settings)
    return latest_full_model(directory) if directory.is_dir() else None


def load_preranker(ref: FullModelRef, verify: bool = True) -> LoadedPreranker:
    path = ref.path / WEIGHTS
    if verify:
        full_model_store(ref.path.parent).verify(ref.version, ref.manifest.files, where=f"pre-ranker {ref.version}")
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as error:
        raise ArtifactError(f"{path}: cannot load: {error}") from error
    if payload.get("format") != WEIGHTS_FORMAT:
        raise ArtifactError(f"{path}: unsupported pre-ranker format {payload.get('format')!r}")
    settings = settings_from_record(ref.manifest.config)
    model = ThreeTowerPreranker(settings.model, settings.prerank, settings.vocabulary)
    model.import_state(payload["model"])
    model.eval()
    return LoadedPreranker(ref, settings, model)


def save_preranker(directory: Path, day: str, model: ThreeTowerPreranker, fields: dict) -> FullModelRef:
    """A new version ``<day>.<n>`` of ``directory``, LATEST pointing at it."""
    store = full_model_store(directory)
    attempts = [int(v.rsplit(".", 1)[1]) for v in store.versions() if v.rsplit(".", 1)[0] == day]
    version = check_model_version(f"{day}.{max(attempts, default=0) + 1}")
    created_at = time.time()

    def manifest(files: dict[str, FileDigest]) -> bytes:
        return FullModelManifest(version=version, day=day, created_at=created_at, files=files, **fields).to_json()

    with store.staging(version) as staging:
        payload = {"format": WEIGHTS_FORMAT, "model": model.export_state()}
        write_file(staging / WEIGHTS, lambda handle: torch.save(payload, handle))  # torch's own errors name no file
        store.seal(staging, version, manifest)
    store.set_pointer(version)
    return next(r for r in list_full_models(directory) if r.version == version)


# --- data ------------------------------------------------------------------------------


def _day_of(ms: int) -> str:
    return date.fromordinal(date(1970, 1, 1).toordinal() + ms // MS_PER_DAY).isoformat()


def item_statistics_for(batches_dir: Path, refs: list[BatchRef]) -> ItemStatistics:
    """Every partition's statistics rows of ``refs`` and of the day before the first."""
    if not refs:
        return ItemStatistics()
    before = _day_of(refs[0].window_start_ms - MS_PER_DAY)
    earlier = list_batches(batches_dir, before) if Path(batches_dir, before).is_dir() else []
    items = ItemStatistics()
    for ref in earlier + refs:
        rows = read_statistics_rows(ref)
        if rows is not None:
            items.apply(item_count_deltas(rows))
    return items


@dataclass
class Prepared:
    """Ranking samples with their encoded statistics features, ready to learn."""

    columns: RankingColumns
    features: np.ndarray  # (N, 13) float32


def prepare(settings: Settings, refs: list[BatchRef], spec: FeatureSpec, items: ItemStatistics) -> Prepared:
    columns = RankingColumns.concat([read_ranking_samples(r, spec) for r in refs], spec)
    p = settings.prerank
    return Prepared(columns, encode_statistics(statistics_counts(columns, items), p.ctr_prior, p.ctr_prior_strength))


def item_categorical_of(model: ThreeTowerPreranker, ids: list[str], categories: list[str]) -> dict[str, list[str]]:
    """Item features of candidates: the category from the sample, the rest from the catalogue."""
    name = model.prerank_config.category_feature
    indices = model.catalogue.indices(ids)
    known = indices >= 0
    out = {}
    for feature in model.item_categorical:
        if feature == name:
            out[feature] = list(categories)
            continue
        column = [""] * len(ids)
        if known.any():
            values = model.catalogue.categorical_columns(indices[known])[feature]
            for position, value in zip(np.flatnonzero(known).tolist(), values):
                column[position] = value
        out[feature] = column
    return out


def model_inputs(model: ThreeTowerPreranker, columns: RankingColumns):
    """(user inputs (R rows), item inputs (N rows), request of each candidate)."""
    users = model.user_inputs(columns.user_ids, columns.user_categorical, columns.user_numeric)
    items = model.item_inputs(columns.candidate_ids, item_categorical_of(model, columns.candidate_ids, columns.categories))
    return users, items, torch.from_numpy(columns.request_of())


@torch.no_grad()
def score(model: ThreeTowerPreranker, prepared: Prepared, chunk_requests: int = 2048) -> np.ndarray:
    """(N,) the pre-ranker's logits of every candidate."""
    columns, parts = prepared.columns, []
    for start in range(0, len(columns), chunk_requests):
        part = columns.take(np.arange(start, min(start + chunk_requests, len(columns))))
        a, b = int(columns.offsets[start]), int(columns.offsets[min(start + chunk_requests, len(columns))])
        users, items, request_of = model_inputs(model, part)
        parts.append(model(users, items, torch.from_numpy(prepared.features[a:b]), request_of).numpy())
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def evaluate_preranker(model: ThreeTowerPreranker, prepared: Prepared, settings: Settings) -> dict:
    if not len(prepared.columns):
        return {"requests": 0}
    was_training = model.training
    model.eval()
    logits = score(model, prepared)
    model.train(was_training)
    c, p = prepared.columns, settings.prerank
    return prerank_quality(logits, c.scores, c.clicked, c.shown, c.offsets, p.eval_top_k, p.eval_keep)


# --- training --------------------------------------------------------------------------


def _observe(model: ThreeTowerPreranker, columns: RankingColumns, today: int, optimizers) -> None:
    new = model.observe_users(columns.user_ids, columns.user_categorical, today)
    new.update(model.observe_items(columns.candidate_ids, item_categorical_of(model, columns.candidate_ids, columns.categories), today))
    known = [i for i, c in enumerate(columns.categories) if c]
    ids = [columns.candidate_ids[i] for i in known]
    model.catalogue.update(ids, item_categorical_of(model, ids, [columns.categories[i] for i in known]), today)
    model.sync_tables(new, optimizers)


def train_prerank_full(settings: Settings, day: str, *, from_scratch: bool = False) -> PrerankTrainingResult | None:
    """Train the pre-ranker on ``day``'s ranking samples; None when it has none."""
    date.fromisoformat(day)
    refs = [r for r in list_batches(settings.batches_dir, day)] if Path(settings.batches_dir, day).is_dir() else []
    ranked = [r for r in refs if "ranking_samples" in r.manifest.extras]
    if not ranked:
        log.info("pre-ranker: no ranking samples for %s (no rank logs): nothing to train", day)
        return None
    spec = FeatureSpec.from_model(settings.model)
    holdout_start_ms, holdout_end_ms, holdout_refs = holdout_batches(settings.batches_dir, day, settings.training.holdout_seconds)
    items = item_statistics_for(settings.batches_dir, refs + holdout_refs)
    train = prepare(settings, ranked, spec, items)
    holdout = prepare(settings, holdout_refs, spec, items)

    directory = prerank_models_dir(settings)
    model, parent = _start_model(settings, day, directory, from_scratch)
    parent_metrics = evaluate_preranker(model, holdout, settings) if parent is not None else None
    model.train()
    training = settings.training
    dense = torch.optim.Adam(model.dense_parameters(), lr=training.full_learning_rate)
    tables = RowWiseAdagrad([t for t, _ in model.table_vocabularies()], lr=training.full_embedding_learning_rate)
    today = date.fromisoformat(day).toordinal() - date(1970, 1, 1).toordinal()
    expired = {}
    for name, table, vocabulary in (("users", model.user_tower.id_embedding, model.user_ids), ("items", model.item_tower.id_embedding, model.item_ids)):
        rows = vocabulary.expire(today)
        reset_rows(table, torch.from_numpy(rows), (dense, tables))
        expired[name] = len(rows)
    _observe(model, train.columns, today, (dense, tables))
    started = time.perf_counter()
    losses = _one_epoch(model, train, settings, day, dense, tables)
    train_seconds = time.perf_counter() - started
    model.eval()
    columns = train.columns
    metrics = evaluate_preranker(model, holdout, settings)
    if parent_metrics is not None:
        metrics["parent"] = {"version": parent.version, **parent_metrics}
    metrics.update(_training_figures(model, columns, losses, train_seconds, expired, settings))
    lineage = _lineage(settings, ranked, holdout_refs)
    clicks = columns.clicked
    fields = dict(
        parent=parent.version if parent else None,
        from_scratch=parent is None,
        data_start_ms=refs[0].window_start_ms,
        data_end_ms=refs[-1].manifest.window_end_ms,
        newest_click_event_time_ms=int(columns.event_time_ms[np.unique(columns.request_of()[clicks])].max()) if clicks.any() else None,
        holdout_start_ms=holdout_start_ms,
        holdout_end_ms=holdout_end_ms,
        metrics=metrics,
        lineage=lineage,
        config=settings.as_record(),
    )
    ref = save_preranker(directory, day, model, fields)
    return PrerankTrainingResult(ref, len(columns), columns.candidates, train_seconds, metrics)


def _start_model(settings: Settings, day: str, directory: Path, from_scratch: bool) -> tuple[ThreeTowerPreranker, FullModelRef | None]:
    """(the model to train, the parent it warm-starts from or None)."""
    parent = None if from_scratch or not directory.is_dir() else previous_full_model(directory, day)
    if parent is None:
        return new_preranker(settings), None
    loaded = load_preranker(parent)
    if loaded.settings.prerank.model_dump(include=_SHAPE) != settings.prerank.model_dump(include=_SHAPE) or loaded.settings.model != settings.model:
        raise ArtifactError(f"pre-ranker shape changed since {parent.version} ({parent.path}); retrain with --from-scratch")
    log.info("pre-ranker %s warm-started from %s", day, parent.version)
    return loaded.model, parent


def _one_epoch(model: ThreeTowerPreranker, train: Prepared, settings: Settings, day: str, dense, tables) -> list[float]:
    """One shuffled epoch over the day's requests, ``prerank.batch_requests``
    per minibatch; the loss of each. A non-finite loss stops it, naming the minibatch."""
    seed = settings.training.seed + date.fromisoformat(day).toordinal()
    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(train.columns))
    columns, offsets = train.columns, train.columns.offsets
    size = settings.prerank.batch_requests
    losses = []
    for start in range(0, len(order), size):
        chosen = order[start : start + size]
        part = columns.take(chosen)
        index = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in chosen.tolist()])
        users, items_in, request_of = model_inputs(model, part)
        logits = model(users, items_in, torch.from_numpy(train.features[index]), request_of, sparse=True)
        loss = prerank_objective(
            logits, torch.from_numpy(part.clicked), torch.from_numpy(part.scores), torch.from_numpy(part.offsets), settings.distillation
        )
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"pre-ranker {day} minibatch {start // size}: loss {float(loss)}")
        dense.zero_grad()
        tables.zero_grad()
        loss.backward()
        dense.step()
        tables.step()
        losses.append(float(loss.detach()))
    return losses


def _training_figures(model: ThreeTowerPreranker, columns: RankingColumns, losses: list[float], seconds: float, expired: dict[str, int],
                      settings: Settings) -> dict:
    return {
        "train_requests": len(columns),
        "train_candidates": columns.candidates,
        "train_seconds": seconds,
        "mean_loss": float(np.mean(losses)) if losses else None,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "expired": expired,
        "users": model.user_ids.admitted,
        "items": len(model.catalogue),
        "distillation": settings.distillation.model_dump(mode="json"),
    }


def _lineage(settings: Settings, ranked: list[BatchRef], holdout_refs: list[BatchRef]) -> list[LineageEntry]:
    return [
        LineageEntry(file=str(r.path.relative_to(settings.batches_dir)), sha256=r.manifest.extras["ranking_samples"]["sha256"],
                     positives=int(r.manifest.extras["ranking_samples"]["records"]), role=role)
        for role, group in (("train", ranked), ("holdout", [r for r in holdout_refs if "ranking_samples" in r.manifest.extras]))
        for r in group
    ]


# the settings that fix the pre-ranker's shape (a warm start needs them unchanged)
_SHAPE = {"id_dim", "categorical_dim", "user_hidden_dims", "item_hidden_dims", "tower_dim", "cross_hidden_dims", "cross_dim",
          "upper_hidden_dims", "category_feature"}
