"""The item catalogue: every item the system may retrieve, with its
categorical features, as learnt from the batches.

Events carry item features on impressions, so the catalogue is filled from
training records (clicked and shown). Hard negatives from rank logs reuse
the features known here; an item never shown keeps unknown ("") features.
Indices are dense (0..n-1) and stable until ``compact`` drops stale items,
which only the daily full trainer does (the online trainer re-bases on the
new catalogue).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
from freshtower.trainer.fingerprint_table import FingerprintTable

from freshtower.core.fingerprints import fingerprint_strings

log = logging.getLogger(__name__)


class ItemCatalogue:
    """Item ID -> dense index, categorical feature values and last day seen.

    >>> catalogue = ItemCatalogue(("category",))
    >>> catalogue.update(["i1", "i2", "i1"], {"category": ["a", "b", ""]}, day=3).tolist()
    [0, 1]
    >>> catalogue.features_of([0, 1]), catalogue.indices(["i2", "zz"]).tolist()
    ([('a',), ('b',)], [1, -1])
    """

    def __init__(self, categorical_names: Sequence[str]):
        self.categorical_names = tuple(categorical_names)
        self.ids: list[str] = []
        self._index: dict[str, int] = {}
        self._by_fingerprint = FingerprintTable()  # hot-path lookups (see trainer/vocabulary.py)
        self._features: list[tuple[str, ...]] = []
        self._last_seen = np.zeros(16, dtype=np.int32)
        self._incomplete: set[int] = set()  # items with an unknown ("") feature value

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    def indices(self, item_ids: Sequence[str], fingerprints: np.ndarray | None = None) -> np.ndarray:
        """Dense index per item (int64), -1 for items not in the catalogue."""
        if fingerprints is None:
            fingerprints = fingerprint_strings(item_ids)
        return self._by_fingerprint.get(fingerprints)

    def indices_of_fingerprints(self, fingerprints: np.ndarray) -> np.ndarray:
        return self._by_fingerprint.get(fingerprints)

    def _index_new(self, fingerprints: np.ndarray, indices: np.ndarray) -> None:
        clash = self._by_fingerprint.get(fingerprints) >= 0
        if clash.any():
            log.warning("64-bit fingerprint collision among items %s", [self.ids[i] for i in indices[clash].tolist()])
            fingerprints, indices = fingerprints[~clash], indices[~clash]
        self._by_fingerprint.put(fingerprints, indices)

    def update(
        self,
        item_ids: Sequence[str],
        categorical: Mapping[str, Sequence[str]] | None = None,
        day: int = 0,
        fingerprints: np.ndarray | None = None,
    ) -> np.ndarray:
        """Add unseen items, fill in unknown features of known ones, mark
        them seen on ``day``. Returns the indices of the items added.

        Known items with complete features cost one table probe: this runs
        on every training minibatch."""
        columns = [categorical.get(name) if categorical else None for name in self.categorical_names]
        if fingerprints is None:
            fingerprints = fingerprint_strings(item_ids)
        indices = self._by_fingerprint.get(fingerprints)
        added: list[int] = []
        added_fingerprints: list[int] = []
        for position in np.flatnonzero(indices < 0).tolist():
            item_id = item_ids[position]
            if not item_id:
                continue
            index = self._index.get(item_id)  # an ID repeated within this call
            if index is None:
                index = len(self.ids)
                self._index[item_id] = index
                self.ids.append(item_id)
                values = tuple("" if c is None else c[position] for c in columns)
                self._features.append(values)
                if "" in values:
                    self._incomplete.add(index)
                added.append(index)
                added_fingerprints.append(int(fingerprints[position]))
            indices[position] = index
        if added:
            self._index_new(np.asarray(added_fingerprints, dtype=np.uint64), np.asarray(added, dtype=np.int64))
        if self._incomplete and any(c is not None for c in columns):
            for position in np.flatnonzero(np.isin(indices, list(self._incomplete))).tolist():
                index = int(indices[position])
                values = tuple("" if c is None else c[position] for c in columns)
                merged = tuple(v or o for v, o in zip(values, self._features[index]))
                self._features[index] = merged
                if "" not in merged:
                    self._incomplete.discard(index)
        if len(self._last_seen) < len(self.ids):
            grown = np.zeros(max(len(self.ids), 2 * len(self._last_seen)), dtype=np.int32)
            grown[: len(self._last_seen)] = self._last_seen
            self._last_seen = grown
        seen = indices[indices >= 0]
        self._last_seen[seen] = np.maximum(self._last_seen[seen], day)
        return np.asarray(added, dtype=np.int64)

    def features_of(self, indices: Sequence[int] | np.ndarray) -> list[tuple[str, ...]]:
        return [self._features[i] for i in np.asarray(indices, dtype=np.int64).tolist()]

    def categorical_columns(self, indices: Sequence[int] | np.ndarray) -> dict[str, list[str]]:
        """Feature values of ``indices`` as name -> column."""
        rows = self.features_of(indices)
        return {name: [r[j] for r in rows] for j, name in enumerate(self.categorical_names)}

    def compact(self, today: int, expiry_days: int) -> "ItemCatalogue":
        """A new catalogue without items unseen since ``today - expiry_days``."""
        cutoff = today - expiry_days
        keep = np.flatnonzero(self._last_seen[: len(self.ids)] >= cutoff)
        return ItemCatalogue.from_state_dict(
            {
                "categorical_names": list(self.categorical_names),
                "ids": [self.ids[i] for i in keep.tolist()],
                "features": [list(self._features[i]) for i in keep.tolist()],
                "last_seen": self._last_seen[keep].tolist(),
            }
        )

    def state_dict(self) -> dict:
        return {
            "categorical_names": list(self.categorical_names),
            "ids": list(self.ids),
            "features": [list(f) for f in self._features],
            "last_seen": self._last_seen[: len(self.ids)].tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "ItemCatalogue":
        catalogue = cls(tuple(state["categorical_names"]))
        catalogue.ids = list(state["ids"])
        catalogue._index = {item_id: i for i, item_id in enumerate(catalogue.ids)}
        if len(catalogue._index) != len(catalogue.ids):
            raise ValueError("catalogue state lists an item twice")
        catalogue._features = [tuple(f) for f in state["features"]]
        catalogue._last_seen = np.zeros(max(16, len(catalogue.ids)), dtype=np.int32)
        catalogue._last_seen[: len(catalogue.ids)] = np.asarray(state["last_seen"], dtype=np.int32)
        catalogue._incomplete = {i for i, f in enumerate(catalogue._features) if "" in f}
        catalogue._by_fingerprint = FingerprintTable(2 * len(catalogue.ids))
        catalogue._index_new(fingerprint_strings(catalogue.ids), np.arange(len(catalogue.ids), dtype=np.int64))
        return catalogue
