"""Ranking metrics: top-K from scores, Recall@K and HitRate@K.

One definition for every place that scores retrieval: the trainer's
holdout evaluation, the served-recall replay of a release store and the
freshness experiment. Pure numpy.

Definitions, for one unit (a user, or a user's hour) with relevant set R
and retrieved list L (best first):

- ``Recall@K = |L[:K] ∩ R| / |R|``, 0 for an empty R;
- ``HitRate@K = 1 if L[:K] ∩ R else 0``.

Means are over all units, those with an empty R included (they count 0).
Relevant items that the catalogue does not hold can never be retrieved but
still count in ``|R|``: ``relevant_positions`` gives each its own negative
placeholder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best columns of each row of ``scores`` (U, N), best first:
    (U, min(k, N)) int64. Ties go to the lower column, so the result equals
    the first ``k`` of a stable sort by descending score; ``-inf`` marks a
    column that must come last (e.g. an item excluded from a unit).
    argpartition keeps it O(N) per row.

    >>> top_k(np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 1.0, 2.0, 0.0]]), 2).tolist()
    [[1, 3], [0, 2]]
    """
    scores = np.asarray(scores)
    units, columns = scores.shape
    k = min(k, columns)
    if k <= 0:
        return np.zeros((units, 0), np.int64)
    candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (U, k), unordered; ties at the k-th score arbitrary
    kth = np.take_along_axis(scores, candidates, axis=1).min(axis=1, keepdims=True)  # (U, 1) the k-th best score
    above = scores > kth  # (U, N) all of these are in every top k
    tied = scores == kth  # (U, N) the lowest-numbered of these fill the rest
    room = k - above.sum(axis=1, keepdims=True)  # (U, 1)
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))  # (U, N), exactly k per row
    columns_chosen = np.nonzero(chosen)[1].reshape(units, k)  # (U, k) ascending column
    chosen_scores = np.take_along_axis(scores, columns_chosen, axis=1)
    order = np.argsort(-chosen_scores, axis=1, kind="stable")  # stable: tied columns stay ascending
    return np.take_along_axis(columns_chosen, order, axis=1).astype(np.int64)


def relevant_positions(positions: Iterable[int]) -> set[int]:
    """The relevant set from catalogue positions, a negative position (an
    item outside the catalogue) made a distinct placeholder that no
    retrieval returns, so that it still counts in ``|R|``.

    >>> sorted(relevant_positions([4, -1, -1, 0]))
    [-4, -3, 0, 4]
    """
    return {int(p) if p >= 0 else -(n + 2) for n, p in enumerate(positions)}


def recall_per_unit(retrieved: np.ndarray, relevant: Sequence[set[int]], k: int) -> np.ndarray:
    """Recall@k of each unit (U,) from (U, >= k) retrieved positions, best first.

    >>> recall_per_unit(np.array([[1, 2, 3], [4, 5, 6]]), [{2, 9}, set()], 2).tolist()
    [0.5, 0.0]
    """
    return np.array([len(wanted.intersection(row)) / len(wanted) if wanted else 0.0 for row, wanted in _rows(retrieved, relevant, k)])


def hits_per_unit(retrieved: np.ndarray, relevant: Sequence[set[int]], k: int) -> np.ndarray:
    """1.0 where a unit's top k holds a relevant item, else 0.0 (U,).

    >>> hits_per_unit(np.array([[1, 2, 3], [4, 5, 6]]), [{2, 9}, {7}], 3).tolist()
    [1.0, 0.0]
    """
    return np.array([float(bool(wanted.intersection(row))) for row, wanted in _rows(retrieved, relevant, k)])


def ranking_metrics(retrieved: np.ndarray, relevant: Sequence[set[int]], ks: Iterable[int]) -> dict[str, float]:
    """Mean Recall@K and HitRate@K over the units, for each K in ``ks``.

    >>> ranking_metrics(np.array([[1, 2, 3], [4, 5, 6]]), [{2, 9}, {7}], ks=(1, 2))
    {'recall@1': 0.0, 'hitrate@1': 0.0, 'recall@2': 0.25, 'hitrate@2': 0.5}
    """
    metrics: dict[str, float] = {}
    units = len(relevant)
    for k in ks:
        # sum() in unit order: the same float as adding unit by unit
        metrics[f"recall@{k}"] = sum(recall_per_unit(retrieved, relevant, k).tolist()) / units if units else 0.0
        metrics[f"hitrate@{k}"] = sum(hits_per_unit(retrieved, relevant, k).tolist()) / units if units else 0.0
    return metrics


def _rows(retrieved: np.ndarray, relevant: Sequence[set[int]], k: int):
    if len(retrieved) != len(relevant):
        raise ValueError(f"{len(retrieved)} retrieved rows for {len(relevant)} relevant sets")
    return zip(np.asarray(retrieved)[:, :k].tolist(), relevant)
