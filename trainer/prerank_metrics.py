"""Quality of a pre-ranker against the ranker and against clicks, over
ragged requests (request ``r`` holds candidates ``offsets[r]:offsets[r + 1]``).

- ``ranker_top_recall``: of the ranker's top ``k`` candidates, the share
  the pre-ranker keeps in its top ``keep`` (what pre-ranking is for: the
  ranker still sees its best ones); 1 when a request has at most ``keep``;
- ``ndcg_vs_ranker``: NDCG@``keep`` of the pre-ranker's order with the
  ranker's scores as gains;
- ``click_auc``: within each request, among the shown candidates, the
  share of (clicked, not clicked) pairs the pre-ranker orders right (ties
  half), averaged over requests that have both.

Ties in a student's scores break by candidate position (a stable sort).
"""

from __future__ import annotations

import numpy as np


def _requests(offsets: np.ndarray):
    for r in range(len(offsets) - 1):
        yield int(offsets[r]), int(offsets[r + 1])


def ranker_top_recall(student: np.ndarray, teacher: np.ndarray, offsets: np.ndarray, k: int = 10, keep: int = 100) -> float:
    """Mean over requests of |teacher top-k ∩ student top-keep| / min(k, n).

    >>> ranker_top_recall(np.array([3.0, 2, 1, 0]), np.array([0.0, 1, 2, 3]), np.array([0, 4]), k=2, keep=2)
    0.0
    """
    values = []
    for a, b in _requests(offsets):
        n = b - a
        if n == 0:
            continue
        top_teacher = np.argsort(-teacher[a:b], kind="stable")[: min(k, n)]
        top_student = np.argsort(-student[a:b], kind="stable")[: min(keep, n)]
        values.append(len(np.intersect1d(top_teacher, top_student)) / len(top_teacher))
    return float(np.mean(values)) if values else float("nan")


def ndcg_vs_ranker(student: np.ndarray, teacher: np.ndarray, offsets: np.ndarray, keep: int = 100) -> float:
    """Mean NDCG@keep of the student's order, gains the teacher's scores.

    >>> round(ndcg_vs_ranker(np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([0, 2])), 4)  # 1/log2(3) over 1
    0.6309
    """
    values = []
    for a, b in _requests(offsets):
        gains = teacher[a:b].astype(np.float64)
        if b - a == 0 or gains.max() <= 0:
            continue
        cut = min(keep, b - a)
        discounts = 1.0 / np.log2(np.arange(2, cut + 2))
        dcg = (gains[np.argsort(-student[a:b], kind="stable")[:cut]] * discounts).sum()
        ideal = (np.sort(gains)[::-1][:cut] * discounts).sum()
        values.append(dcg / ideal)
    return float(np.mean(values)) if values else float("nan")


def click_auc(student: np.ndarray, clicked: np.ndarray, shown: np.ndarray, offsets: np.ndarray) -> float:
    """Mean within-request AUC of clicked over shown-not-clicked candidates.

    >>> click_auc(np.array([0.9, 0.1, 0.5]), np.array([True, False, False]), np.array([True, True, True]), np.array([0, 3]))
    1.0
    """
    values = []
    for a, b in _requests(offsets):
        s, c, v = student[a:b], clicked[a:b], shown[a:b]
        positive, negative = s[c & v], s[~c & v]
        if len(positive) == 0 or len(negative) == 0:
            continue
        difference = positive[:, None] - negative[None, :]
        values.append(float(((difference > 0) + 0.5 * (difference == 0)).mean()))
    return float(np.mean(values)) if values else float("nan")


def prerank_quality(student, teacher, clicked, shown, offsets, k: int, keep: int) -> dict:
    """All three, keyed as the model manifest and the experiment record them."""
    return {
        f"ranker_top{k}_in_top{keep}": ranker_top_recall(student, teacher, offsets, k, keep),
        f"ndcg@{keep}": ndcg_vs_ranker(student, teacher, offsets, keep),
        "click_auc": click_auc(student, clicked, shown, offsets),
        "requests": int(len(offsets) - 1),
    }
