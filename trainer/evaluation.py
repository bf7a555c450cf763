"""Offline evaluation: Recall@K and HitRate@K on a time-split holdout, with
exact search and with the Faiss index that serving would use.

For each holdout user, the relevant set is the items they clicked in the
holdout period; the query is their user vector from the features of their
first holdout record. ``Recall@K`` averages ``|top-K ∩ clicked| / |clicked|``
over users; ``HitRate@K`` is the share of users with at least one clicked
item in their top K (both defined once, in ``trainer/metrics.py``). Clicked
items missing from the catalogue count as misses (the model could not have
retrieved them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from freshtower.trainer.metrics import ranking_metrics, relevant_positions
from freshtower.trainer.model import TwoTowerModel
from freshtower.trainer.retrieval import ExactRetriever, IndexSettings, build_index

from freshtower.core.batches import SampleColumns


@dataclass
class Holdout:
    """Users to evaluate and what they clicked."""

    user_ids: list[str]
    user_categorical: dict[str, list[str]]
    user_numeric: np.ndarray  # (U, F)
    clicked: list[set[str]]  # item IDs clicked per user

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def clicks(self) -> int:
        return sum(len(c) for c in self.clicked)


def holdout_from_samples(columns: SampleColumns) -> Holdout:
    """Group clicked samples by user; features from each user's first record."""
    first: dict[str, int] = {}
    clicked: dict[str, set[str]] = {}
    order = np.argsort(columns.event_time_ms, kind="stable")
    for i in order.tolist():
        if columns.labels[i] != 1:
            continue
        user = columns.user_ids[i]
        if user not in first:
            first[user] = i
            clicked[user] = set()
        clicked[user].add(columns.item_ids[i])
    rows = list(first.values())
    return Holdout(
        user_ids=list(first.keys()),
        user_categorical={k: [v[i] for i in rows] for k, v in columns.user_categorical.items()},
        user_numeric=columns.user_numeric[rows] if rows else columns.user_numeric[:0],
        clicked=list(clicked.values()),
    )


@torch.no_grad()
def holdout_user_vectors(model: TwoTowerModel, holdout: Holdout, chunk: int = 8192) -> np.ndarray:
    parts = []
    for start in range(0, len(holdout), chunk):
        stop = min(start + chunk, len(holdout))
        inputs = model.user_inputs(
            holdout.user_ids[start:stop],
            {k: v[start:stop] for k, v in holdout.user_categorical.items()},
            holdout.user_numeric[start:stop],
        )
        parts.append(model.user_vectors(inputs).numpy())
    if not parts:
        return np.zeros((0, model.config.output_dim), np.float32)
    return np.concatenate(parts)


def evaluate(
    model: TwoTowerModel,
    holdout: Holdout,
    ks=(50, 100, 200),
    index_settings: IndexSettings | None = IndexSettings(),
    item_vectors: np.ndarray | None = None,
) -> dict:
    """Metrics with exact search and, unless ``index_settings`` is None, with
    the Faiss index built as serving builds it. Times are wall seconds."""
    started = time.perf_counter()
    if item_vectors is None:
        item_vectors = model.catalogue_vectors().numpy()
    user_vectors = holdout_user_vectors(model, holdout)
    relevant = [_with_missing(c, model) for c in holdout.clicked]
    k_max = min(max(ks), max(len(item_vectors), 1))
    result: dict = {"users": len(holdout), "clicks": holdout.clicks, "items": int(len(item_vectors))}
    if len(holdout) == 0 or len(item_vectors) == 0:
        return result
    search_started = time.perf_counter()
    _, exact = ExactRetriever(item_vectors).search(user_vectors, k_max)
    result["exact"] = ranking_metrics(exact, relevant, ks)
    result["exact_search_seconds"] = time.perf_counter() - search_started
    if index_settings is not None:
        index = build_index(item_vectors, index_settings)
        search_started = time.perf_counter()
        _, approximate = index.search(user_vectors, k_max)
        result["faiss"] = ranking_metrics(approximate, relevant, ks)
        result["faiss_index"] = index.kind
        result["faiss_search_seconds"] = time.perf_counter() - search_started
    result["seconds"] = time.perf_counter() - started
    return result


def _with_missing(clicked: set[str], model: TwoTowerModel) -> set[int]:
    """Catalogue indices of ``clicked``; items outside the catalogue become
    distinct negative placeholders that no retrieval can return
    (``metrics.relevant_positions``)."""
    return relevant_positions(model.catalogue.indices(sorted(clicked)).tolist())


def holdout_between(refs, spec, start_ms: int, end_ms: int) -> Holdout:
    """The clicks of the batches whose window starts in [start_ms, end_ms):
    the next-period holdout of a time-split evaluation."""
    from freshtower.core.batches import SampleColumns, read_batch

    chosen = [r for r in refs if start_ms <= r.window_start_ms < end_ms]
    return holdout_from_samples(SampleColumns.concat([read_batch(r, spec) for r in chosen], spec))
