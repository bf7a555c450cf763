"""What today's clicks say about items first seen since the full model.

An item born after the full model's data end has no ID row of its own: the
frozen item tower gives it the vector of its features (see
``publisher.new_items``), which is the same for every new item of a
category and, in a large catalogue, ranks below hundreds of trained items.
Its clicks since then say more: the users who clicked it. The online
trainer keeps, per such item, the sum of the vectors of the users who
clicked it (each at the moment the trainer learnt the click) and the count.
An embeddings release then serves

    normalize(prior * feature_vector + sum of clicker vectors)

so an item nobody clicked yet keeps its feature vector, and one clicked by
a few users moves toward them (and toward users like them): the closed form
of learning its ID row from its clicks with the towers frozen, the
mean-of-positives start of a new ID. ``prior`` (``publisher.new_item_click_prior``)
weighs the feature vector as that many clicks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class NewItemClicks:
    """A copy of the sums for the new items ``first, first + 1, ...`` (catalogue indices)."""

    first: int
    sums: np.ndarray  # (n, D) float32: sum of the clickers' user vectors
    counts: np.ndarray  # (n,) int64: clicks learnt


class NewItemClickSums:
    """Running sums of clicker vectors per catalogue item at or after ``first``.

    >>> sums = NewItemClickSums(first=2, dim=2)
    >>> sums.add(np.array([0, 3, 3]), np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32))
    >>> got = sums.snapshot(4)
    >>> got.first, got.counts.tolist(), got.sums.tolist()
    (2, [0, 2], [[0.0, 0.0], [0.0, 2.0]])
    """

    def __init__(self, first: int, dim: int):
        self.first = int(first)
        self._sums = np.zeros((0, dim), np.float32)
        self._counts = np.zeros(0, np.int64)

    def add(self, indices: np.ndarray, user_vectors: np.ndarray) -> None:
        """Count the clicks on catalogue ``indices`` (older items and -1 ignored) by users of ``user_vectors``."""
        indices = np.asarray(indices, np.int64)
        new = indices >= self.first
        if not new.any():
            return
        offsets = indices[new] - self.first
        self._grow(int(offsets.max()) + 1)
        np.add.at(self._sums, offsets, np.asarray(user_vectors, np.float32)[new])
        np.add.at(self._counts, offsets, 1)

    def _grow(self, needed: int) -> None:
        if needed > len(self._counts):
            size = max(needed, 2 * len(self._counts))
            self._sums = np.concatenate([self._sums, np.zeros((size - len(self._sums), self._sums.shape[1]), np.float32)])
            self._counts = np.concatenate([self._counts, np.zeros(size - len(self._counts), np.int64)])

    def state_dict(self, catalogue_ids: list[str]) -> dict:
        """The clicked new items by ID (for the online checkpoint, which the publisher reads)."""
        snap = self.snapshot(len(catalogue_ids))
        clicked = np.flatnonzero(snap.counts > 0)
        return {
            "item_ids": [catalogue_ids[self.first + int(i)] for i in clicked],
            "sums": torch.from_numpy(snap.sums[clicked].copy()),
            "counts": torch.from_numpy(snap.counts[clicked].copy()),
        }

    def load_state_dict(self, state: dict, indices: np.ndarray) -> None:
        """Restore the sums of ``state`` (``state_dict``), its items at catalogue ``indices`` (-1: not in the catalogue)."""
        if not state:
            return
        sums, counts = state["sums"].numpy(), state["counts"].numpy()
        indices = np.asarray(indices, np.int64)
        keep = np.flatnonzero(indices >= self.first)
        if len(keep):
            offsets = indices[keep] - self.first
            self._grow(int(offsets.max()) + 1)
            self._sums[offsets], self._counts[offsets] = sums[keep], counts[keep]

    def snapshot(self, count: int) -> NewItemClicks:
        """The sums of catalogue items ``first .. count - 1`` (zeros for the unclicked), copied."""
        n = max(int(count) - self.first, 0)
        sums = np.zeros((n, self._sums.shape[1]), np.float32)
        counts = np.zeros(n, np.int64)
        have = min(n, len(self._counts))
        sums[:have], counts[:have] = self._sums[:have], self._counts[:have]
        return NewItemClicks(self.first, sums, counts)


def clicks_of(item_ids: list[str], states: list[dict], dim: int) -> NewItemClicks:
    """The click sums of ``item_ids`` over the checkpoints' ``state_dict``s (user partitions add up).

    >>> a = {"item_ids": ["x"], "sums": torch.ones(1, 2), "counts": torch.tensor([1])}
    >>> b = {"item_ids": ["x", "y"], "sums": torch.ones(2, 2), "counts": torch.tensor([2, 1])}
    >>> got = clicks_of(["y", "z", "x"], [a, b, {}], dim=2)
    >>> got.counts.tolist(), got.sums.tolist()
    ([1, 0, 3], [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]])
    """
    where = {item: n for n, item in enumerate(item_ids)}
    sums, counts = np.zeros((len(item_ids), dim), np.float32), np.zeros(len(item_ids), np.int64)
    for state in states:
        if not state:
            continue
        state_sums, state_counts = state["sums"].numpy(), state["counts"].numpy()
        for offset, item in enumerate(state["item_ids"]):
            n = where.get(item)
            if n is not None:
                sums[n] += state_sums[offset]
                counts[n] += int(state_counts[offset])
    return NewItemClicks(0, sums, counts)


def blend_with_clicks(feature_vectors: np.ndarray, clicks: NewItemClicks, prior: float) -> np.ndarray:
    """Unit vectors ``normalize(prior * feature_vectors + sums)``; rows without clicks stay as they are.

    >>> clicks = NewItemClicks(0, np.array([[0.0, 0.0], [0.0, 3.0]], np.float32), np.array([0, 3]))
    >>> blend_with_clicks(np.array([[1.0, 0.0], [1.0, 0.0]], np.float32), clicks, prior=3.0).astype(float).round(3).tolist()
    [[1.0, 0.0], [0.707, 0.707]]
    """
    if len(feature_vectors) != len(clicks.counts):
        raise ValueError(f"{len(feature_vectors)} feature vectors for {len(clicks.counts)} new items' click sums")
    blended = prior * feature_vectors.astype(np.float32) + clicks.sums
    norms = np.linalg.norm(blended, axis=1, keepdims=True)
    clicked = (clicks.counts > 0)[:, None] & (norms > 0)
    return np.where(clicked, blended / np.where(norms > 0, norms, 1.0), feature_vectors).astype(np.float32)


__all__ = ["NewItemClickSums", "NewItemClicks", "blend_with_clicks", "clicks_of"]
