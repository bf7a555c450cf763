"""Checks a release must pass before it is published.

Pure functions over arrays and numbers: each raises ``ReleaseRefused`` with
a reason that names what failed and where; the publisher then keeps the
active release and reports the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


class ReleaseRefused(ValueError):
    """A release failed a check; the active release stays."""


def check_finite(named: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Refuse NaN or infinite values, naming the array, the count and the first row.

    >>> check_finite({"user_embeddings": np.array([[0.1, 0.2], [np.nan, 1.0]])})
    Traceback (most recent call last):
    ...
    freshtower.publisher.checks.ReleaseRefused: user_embeddings has 1 NaN/infinite value(s), first in row 1
    """
    for name, values in named.items():
        array = values.detach().numpy() if torch.is_tensor(values) else np.asarray(values)
        bad = ~np.isfinite(array)
        if bad.any():
            first = np.argwhere(bad)[0]
            where = f", first in row {int(first[0])}" if array.ndim >= 1 else ""
            raise ReleaseRefused(f"{name} has {int(bad.sum())} NaN/infinite value(s){where}")


def check_shape(name: str, array: np.ndarray, rows: int, dim: int) -> None:
    """Refuse an array that is not (rows, dim).

    >>> check_shape("item_vectors", np.zeros((3, 8)), rows=3, dim=16)
    Traceback (most recent call last):
    ...
    freshtower.publisher.checks.ReleaseRefused: item_vectors has shape (3, 8), expected (3, 16)
    """
    if array.ndim != 2 or array.shape != (rows, dim):
        raise ReleaseRefused(f"{name} has shape {tuple(array.shape)}, expected ({rows}, {dim})")


@dataclass(frozen=True)
class GateBaseline:
    """What a full model's holdout Recall@50 is compared with."""

    recall: float | None
    paired: bool  # scored on the same holdout clicks as the model
    source: str  # in words, for the manifest and the log
    against: str  # for the refusal: "... below <against> 0.41"


def gate_baseline(metrics: Mapping, active_model_version: str | None, active_recall: float | None, k: int = 50) -> GateBaseline:
    """The paired baseline when there is one: the model's parent scored on
    the model's own holdout clicks before it learnt the day, if that parent
    is the model the active full release serves. Otherwise the active
    release's recall on *its* holdout (other clicks, another day's first
    minutes), which only a large holdout makes comparable.

    >>> m = {"clicks": 300, "exact": {"recall@50": 0.50}, "parent": {"version": "d1.1", "exact": {"recall@50": 0.49}}}
    >>> gate_baseline(m, "d1.1", 0.69)
    GateBaseline(recall=0.49, paired=True, source='parent d1.1 on the same 300 holdout clicks', against="its parent d1.1's")
    >>> gate_baseline(m, "d0.1", 0.69).source
    "active release's own holdout"
    """
    parent = metrics.get("parent") or {}
    parent_recall = (parent.get("exact") or {}).get(f"recall@{k}")
    if parent_recall is not None and active_model_version is not None and parent.get("version") == active_model_version:
        version = parent["version"]
        return GateBaseline(float(parent_recall), True, f"parent {version} on the same {metrics.get('clicks', 0)} holdout clicks", f"its parent {version}'s")
    return GateBaseline(active_recall, False, "active release's own holdout", "the active release's")


def check_recall_drop(
    new_recall: float | None, baseline: float | None, max_drop: float, metric: str = "holdout recall@50", *,
    clicks: int | None = None, min_clicks: int = 0, against: str = "the active release's",
) -> None:
    """Refuse a full model whose holdout recall fell more than ``max_drop``
    below its baseline. No baseline: nothing to compare. A holdout of fewer
    than ``min_clicks`` clicks is too small to refuse on: its recall moves
    by more than any sensible ``max_drop`` from one night to the next.

    >>> check_recall_drop(0.40, 0.41, max_drop=0.02)  # fell 0.01: fine
    >>> check_recall_drop(0.35, 0.41, max_drop=0.02, clicks=12, min_clicks=100)  # 12 clicks: too few to judge
    >>> check_recall_drop(0.35, 0.41, max_drop=0.02)
    Traceback (most recent call last):
    ...
    freshtower.publisher.checks.ReleaseRefused: holdout recall@50 0.3500 is 0.0600 below the active release's 0.4100 (allowed drop 0.0200)
    """
    if baseline is None:
        return
    if new_recall is None:
        raise ReleaseRefused(f"the model reports no {metric}, so it cannot be compared with {against} {baseline:.4f}")
    if clicks is not None and clicks < min_clicks:
        return
    if new_recall < baseline - max_drop:
        raise ReleaseRefused(
            f"{metric} {new_recall:.4f} is {baseline - new_recall:.4f} below {against} {baseline:.4f} "
            f"(allowed drop {max_drop:.4f})"
        )


def check_index_recall(recall: float, minimum: float, k: int) -> None:
    """Refuse an index that misses too much of the exact top k.

    >>> check_index_recall(0.97, 0.9, k=100)
    """
    if recall < minimum:
        raise ReleaseRefused(f"index recall@{k} against exact search is {recall:.4f}, below the configured minimum {minimum:.4f}")


def check_unique(name: str, ids: list[str]) -> None:
    """Refuse duplicate IDs (two rows for one user or item).

    >>> check_unique("item_ids", ["a", "b", "a"])
    Traceback (most recent call last):
    ...
    freshtower.publisher.checks.ReleaseRefused: item_ids lists 1 ID more than once, e.g. 'a'
    """
    seen: set[str] = set()
    duplicates = [i for i in ids if i in seen or seen.add(i)]
    if duplicates:
        raise ReleaseRefused(f"{name} lists {len(set(duplicates))} ID more than once, e.g. {duplicates[0]!r}")
