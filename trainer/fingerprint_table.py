"""A hash table from 64-bit ID fingerprints to int64 values, in numpy:
open addressing with linear probing, every operation vectorised over a
batch of keys (one probe round per array pass).

The trainers' hot paths map thousands of IDs per step; this turns that
into a few array operations instead of a Python dict lookup per ID.
Fingerprints come from ``freshtower.core.fingerprints`` and are never 0, which
marks an empty slot. Deletion is by ``rebuild`` (expiry runs once a day).
"""

from __future__ import annotations

import numpy as np

_EMPTY = np.uint64(0)


class FingerprintTable:
    """uint64 fingerprint -> int64 value (-1 reads as missing).

    >>> table = FingerprintTable()
    >>> table.put(np.array([11, 22], dtype=np.uint64), np.array([1, 2]))
    >>> table.get(np.array([22, 33, 11], dtype=np.uint64)).tolist()
    [2, -1, 1]
    """

    def __init__(self, capacity: int = 1024):
        capacity = 1 << max(4, int(np.ceil(np.log2(max(capacity, 16)))))
        self._keys = np.zeros(capacity, dtype=np.uint64)
        self._values = np.full(capacity, -1, dtype=np.int64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        return (keys & np.uint64(len(self._keys) - 1)).astype(np.int64)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Values of ``keys`` (-1 where absent)."""
        keys = np.asarray(keys, dtype=np.uint64)
        slots = self._slots(keys)
        # The first probe round over all keys at once, without index lists:
        # it settles most keys, so later rounds see only the few that probe on.
        stored = self._keys[slots]
        found = stored == keys
        result = np.where(found, self._values[slots], -1)
        pending = np.flatnonzero(~found & (stored != _EMPTY))
        slots = slots[pending]
        mask = len(self._keys) - 1
        while len(pending):
            slots = (slots + 1) & mask
            stored = self._keys[slots]
            found = stored == keys[pending]
            result[pending[found]] = self._values[slots[found]]
            probing = ~found & (stored != _EMPTY)
            pending = pending[probing]
            slots = slots[probing]
        return result

    def put(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert or overwrite; ``keys`` must not repeat within one call."""
        keys = np.asarray(keys, dtype=np.uint64)
        values = np.asarray(values, dtype=np.int64)
        if np.any(keys == _EMPTY):
            raise ValueError("fingerprint 0 is reserved for empty slots")
        if 2 * (self._size + len(keys)) > len(self._keys):
            self._grow(2 * (self._size + len(keys)))
        pending = np.arange(len(keys))
        slots = self._slots(keys)
        mask = len(self._keys) - 1
        while len(pending):
            stored = self._keys[slots]
            same = stored == keys[pending]
            self._values[slots[same]] = values[pending[same]]
            empty = stored == _EMPTY
            # Several keys may reach the same empty slot in one round: the
            # first claims it, the others probe on.
            candidates = np.flatnonzero(empty)
            _, first = np.unique(slots[candidates], return_index=True)
            claim = candidates[first]
            self._keys[slots[claim]] = keys[pending[claim]]
            self._values[slots[claim]] = values[pending[claim]]
            self._size += len(claim)
            settled = same.copy()
            settled[claim] = True
            pending = pending[~settled]
            slots = (slots[~settled] + 1) & mask

    def _grow(self, minimum: int) -> None:
        occupied = self._keys != _EMPTY
        keys, values = self._keys[occupied], self._values[occupied]
        capacity = len(self._keys)
        while capacity < minimum:
            capacity *= 2
        self._keys = np.zeros(capacity, dtype=np.uint64)
        self._values = np.full(capacity, -1, dtype=np.int64)
        self._size = 0
        self.put(keys, values)

    def rebuild(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Replace the whole content (how entries are deleted)."""
        self._keys = np.zeros(len(self._keys), dtype=np.uint64)
        self._values = np.full(len(self._keys), -1, dtype=np.int64)
        self._size = 0
        self.put(keys, values)
