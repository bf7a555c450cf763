"""Collisionless ID vocabularies: raw string ID -> embedding row.

As in Monolith, a table grows as new IDs arrive instead of hashing them into
a fixed number of buckets, with two guards on its size:

- a frequency filter: an ID gets its own row only after ``min_count``
  sightings; until then it reads the shared default row 0 (the cold-start
  embedding);
- expiry: an ID unseen for ``expiry_days`` days loses its row, which is
  reused by a later ID.

Hot-path lookups go through the ID's 64-bit fingerprint
(``freshtower.core.fingerprints``) in a numpy hash table: Monolith likewise keys its
tables by 64-bit feature IDs. Two IDs would share a row only if their
fingerprints collided (probability about n^2 / 2^65: 3e-8 for a million
IDs); the exact ID -> row dict is kept beside the table, detects such a
collision when the second ID would be admitted, and logs it.

A sighting is whatever the caller says it is; the trainers count training
samples (clicks). The vocabulary holds no tensors: the model grows its
tables to ``len(vocabulary)`` rows and initialises the rows that
``observe`` reports as new.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from freshtower.trainer.fingerprint_table import FingerprintTable

from freshtower.core.contracts import VocabularyState
from freshtower.core.fingerprints import fingerprint_strings

DEFAULT_ROW = 0
log = logging.getLogger(__name__)


class IdVocabulary:
    """Raw ID -> row map with a frequency filter and expiry.

    >>> vocab = IdVocabulary(min_count=2)
    >>> vocab.observe(["a", "b", "a"], day=0).tolist()  # "a" admitted on its 2nd sighting
    [1]
    >>> vocab.lookup(["a", "b", "unknown"]).tolist()
    [1, 0, 0]
    """

    def __init__(self, min_count: int = 1, expiry_days: int | None = None):
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.min_count = min_count
        self.expiry_days = expiry_days
        self._rows: dict[str, int] = {}
        self._by_fingerprint = FingerprintTable()
        self._row_ids: list[str | None] = [None]  # row -> ID; row 0 is the default row
        self._last_seen = np.zeros(16, dtype=np.int32)  # row -> last day seen
        self._free_rows: list[int] = []
        self._pending: dict[str, list[int]] = {}  # not yet admitted: ID -> [sightings, last day]
        self.collisions = 0

    def __len__(self) -> int:
        """Rows in use, including the default row and freed rows awaiting reuse."""
        return len(self._row_ids)

    def __contains__(self, raw_id: str) -> bool:
        return raw_id in self._rows

    @property
    def admitted(self) -> int:
        """IDs that own a row."""
        return len(self._rows)

    def row_of(self, raw_id: str) -> int:
        return self._rows.get(raw_id, DEFAULT_ROW)

    def id_of(self, row: int) -> str | None:
        return self._row_ids[row]

    def lookup(self, raw_ids: Sequence[str], fingerprints: np.ndarray | None = None) -> np.ndarray:
        """Rows of ``raw_ids`` (int64); unknown or not-yet-admitted IDs read row 0.
        Pass the IDs' ``fingerprints`` if they are at hand."""
        if fingerprints is None:
            fingerprints = fingerprint_strings(raw_ids)
        rows = self._by_fingerprint.get(fingerprints)
        rows[rows < 0] = DEFAULT_ROW
        return rows

    def observe(self, raw_ids: Sequence[str], day: int, fingerprints: np.ndarray | None = None) -> np.ndarray:
        """Count one sighting of each ID on ``day`` (days since the epoch);
        return the rows newly assigned (to be initialised by the caller).

        Empty IDs are ignored: they stand for "unknown" and stay on row 0.
        Known IDs cost a table probe; only unknown ones touch Python dicts.
        """
        if fingerprints is None:
            fingerprints = fingerprint_strings(raw_ids)
        rows = self._by_fingerprint.get(fingerprints)
        known = rows[rows >= 0]
        if len(known):
            self._last_seen[known] = day
        new_rows: list[int] = []
        new_fingerprints: list[int] = []
        for position in np.flatnonzero(rows < 0).tolist():
            raw_id = raw_ids[position]
            if not raw_id:
                continue
            row = self._rows.get(raw_id)  # admitted earlier in this call
            if row is not None:
                self._last_seen[row] = day
                continue
            pending = self._pending.get(raw_id)
            count = 1 if pending is None else pending[0] + 1
            if count < self.min_count:
                if pending is None:
                    self._pending[raw_id] = [count, day]
                else:
                    pending[0] = count
                    pending[1] = day
                continue
            if pending is not None:
                del self._pending[raw_id]
            row = self._assign(raw_id)
            self._last_seen[row] = day
            new_rows.append(row)
            new_fingerprints.append(int(fingerprints[position]))
        if new_rows:
            self._index_new(np.asarray(new_fingerprints, dtype=np.uint64), np.asarray(new_rows, dtype=np.int64))
        return np.asarray(new_rows, dtype=np.int64)

    def _index_new(self, fingerprints: np.ndarray, rows: np.ndarray) -> None:
        clash = self._by_fingerprint.get(fingerprints) >= 0
        unique, first = np.unique(fingerprints, return_index=True)
        if clash.any() or len(unique) < len(fingerprints):
            # Two distinct IDs with one fingerprint: the later one keeps its
            # row for the record, but lookups keep finding the first.
            self.collisions += int(clash.sum()) + len(fingerprints) - len(unique)
            log.warning("64-bit fingerprint collision among IDs %s", [self._row_ids[r] for r in rows[clash].tolist()])
            keep = np.zeros(len(fingerprints), dtype=bool)
            keep[first] = True
            keep &= ~clash
            fingerprints, rows = fingerprints[keep], rows[keep]
        self._by_fingerprint.put(fingerprints, rows)

    def _assign(self, raw_id: str) -> int:
        if self._free_rows:
            row = self._free_rows.pop()
            self._row_ids[row] = raw_id
        else:
            row = len(self._row_ids)
            self._row_ids.append(raw_id)
            if row >= len(self._last_seen):
                grown = np.zeros(max(16, 2 * len(self._last_seen)), dtype=np.int32)
                grown[: len(self._last_seen)] = self._last_seen
                self._last_seen = grown
        self._rows[raw_id] = row
        return row

    def expire(self, today: int) -> np.ndarray:
        """Free the rows of IDs unseen since ``today - expiry_days``; return them.

        The caller resets those rows (they read as the default again until a
        new ID takes them). Pending sightings that old are forgotten too.
        """
        if self.expiry_days is None:
            return np.zeros(0, dtype=np.int64)
        cutoff = today - self.expiry_days
        used = len(self._row_ids)
        stale = np.flatnonzero(self._last_seen[:used] < cutoff)
        freed = []
        for row in stale.tolist():
            raw_id = self._row_ids[row]
            if row == DEFAULT_ROW or raw_id is None:
                continue
            del self._rows[raw_id]
            self._row_ids[row] = None
            self._free_rows.append(row)
            freed.append(row)
        self._pending = {k: v for k, v in self._pending.items() if v[1] >= cutoff}
        if freed:
            self._reindex()
        return np.asarray(freed, dtype=np.int64)

    def _reindex(self) -> None:
        ids = list(self._rows.keys())
        self._by_fingerprint = FingerprintTable(2 * len(ids))
        if ids:
            self._index_new(fingerprint_strings(ids), np.fromiter(self._rows.values(), dtype=np.int64, count=len(ids)))

    def row_ids(self) -> list[str | None]:
        """Row -> ID (None for the default row and free rows)."""
        return list(self._row_ids)

    # --- persistence (plain lists: loads with weights_only) ----------------------

    def state(self) -> VocabularyState:
        """What is saved of the vocabulary (the contract readers see)."""
        return VocabularyState(
            min_count=self.min_count,
            expiry_days=self.expiry_days,
            row_ids=["" if r is None else r for r in self._row_ids],
            last_seen=self._last_seen[: len(self._row_ids)].tolist(),
            pending_ids=list(self._pending.keys()),
            pending=[list(v) for v in self._pending.values()],
        )

    @classmethod
    def from_state(cls, state: VocabularyState) -> "IdVocabulary":
        vocab = cls(min_count=state.min_count, expiry_days=state.expiry_days)
        row_ids: list[str | None] = [None if r == "" else r for r in state.row_ids]
        row_ids[DEFAULT_ROW] = None
        vocab._row_ids = row_ids
        vocab._rows = {r: i for i, r in enumerate(row_ids) if r is not None}
        if len(vocab._rows) != sum(r is not None for r in row_ids):
            raise ValueError("vocabulary state lists an ID on two rows")
        vocab._free_rows = [i for i, r in enumerate(row_ids) if r is None and i != DEFAULT_ROW]
        last_seen = np.asarray(state.last_seen, dtype=np.int32)
        vocab._last_seen = np.zeros(max(16, len(row_ids)), dtype=np.int32)
        vocab._last_seen[: len(last_seen)] = last_seen
        vocab._pending = {k: [int(v[0]), int(v[1])] for k, v in zip(state.pending_ids, state.pending)}
        vocab._reindex()
        return vocab

    def state_dict(self) -> dict:
        """``state()`` as plain lists and dicts, for torch.save."""
        return self.state().to_payload()

    @classmethod
    def from_state_dict(cls, payload: dict) -> "IdVocabulary":
        return cls.from_state(VocabularyState.from_payload(payload))
