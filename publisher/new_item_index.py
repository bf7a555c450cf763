"""The items served beside the full release's index: those born since it.

An embeddings release carries the vectors of every item first seen since
its full release (``new_item_ids.json``, ``new_item_vectors.npy``, see
``publisher/new_items.py``). Serving keeps them in a second, small index
built from the release's file when the release is loaded (exact search
below the full release's ``exact_below``, HNSW above, as the full index),
and a search takes the best k of both by cosine (``merge_top_k``). The
full release's index is never changed: it is shared, read-only, by every
state of the chain, so a request on the old state and the swap to a new
one never touch the same index object being written.

Each release's file holds all new items so far, so a state's new items are
its own release's; the chain before it does not matter.
"""

from __future__ import annotations

import json
from collections.abc import Set
from dataclasses import dataclass

import numpy as np
from freshtower.publisher.releases import Release, ReleaseError
from freshtower.trainer.retrieval import FaissRetriever, IndexSettings, build_index

from freshtower.core.contracts import EmbeddingsReleaseManifest
from freshtower.core.contracts.release_manifest import NEW_ITEM_IDS, NEW_ITEM_VECTORS


@dataclass(frozen=True)
class NewItemIndex:
    item_ids: tuple[str, ...]  # row -> item ID
    index: FaissRetriever | None  # None when there is none

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def empty(cls) -> NewItemIndex:
        return cls((), None)

    @classmethod
    def of_release(cls, release: Release, full_items: Set[str], output_dim: int, settings: IndexSettings) -> NewItemIndex:
        """The new items ``release`` carries (none if it carries no
        new-item files). Raises ReleaseError when they do not fit: shapes,
        non-finite or non-unit vectors, duplicate IDs, or an ID the full
        release already serves."""
        manifest = release.manifest
        if not isinstance(manifest, EmbeddingsReleaseManifest) or manifest.new_items is None:
            return cls.empty()
        where = f"release {release.version}"
        item_ids = json.loads(release.file(NEW_ITEM_IDS).read_text())
        vectors = np.load(release.file(NEW_ITEM_VECTORS))
        if not isinstance(item_ids, list) or not all(isinstance(i, str) and i for i in item_ids):
            raise ReleaseError(f"{where}: {NEW_ITEM_IDS} is not a list of item IDs")
        if vectors.shape != (len(item_ids), output_dim) or len(item_ids) != manifest.new_items.count:
            raise ReleaseError(
                f"{where}: {NEW_ITEM_VECTORS} holds {vectors.shape}, expected {manifest.new_items.count} new items "
                f"({len(item_ids)} IDs) x {output_dim}"
            )
        if not np.isfinite(vectors).all():
            raise ReleaseError(f"{where}: {NEW_ITEM_VECTORS} holds NaN or infinite values")
        if len(vectors) and np.abs(np.linalg.norm(vectors, axis=1) - 1).max() > 1e-3:
            raise ReleaseError(f"{where}: {NEW_ITEM_VECTORS} holds vectors that are not of unit length")
        if len(set(item_ids)) != len(item_ids):
            raise ReleaseError(f"{where}: {NEW_ITEM_IDS} lists an item twice")
        served = [i for i in item_ids if i in full_items]
        if served:
            raise ReleaseError(f"{where}: new items {served[:5]} are in the full release's index already")
        if not item_ids:
            return cls.empty()
        return cls(tuple(item_ids), build_index(vectors.astype(np.float32, copy=False), settings))


def merge_top_k(
    scores: np.ndarray, rows: np.ndarray, new_scores: np.ndarray, new_rows: np.ndarray, offset: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two searches' results, per query. Rows of the
    second search are shifted by ``offset`` (the first index's size), so
    the result indexes the first index's items followed by the second's;
    -1 marks padding (fewer than k found), placed last.

    >>> s, r = merge_top_k(np.array([[0.9, 0.5]]), np.array([[3, 1]]), np.array([[0.7, -1.0]]), np.array([[0, -1]]), 10, 3)
    >>> [round(float(x), 2) for x in s[0]], r.tolist()
    ([0.9, 0.7, 0.5], [[3, 10, 1]])
    """
    scores = np.concatenate([scores, new_scores], axis=1).astype(np.float32)  # (Q, k1 + k2)
    rows = np.concatenate([rows, np.where(new_rows >= 0, new_rows + offset, -1)], axis=1)
    scores[rows < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
