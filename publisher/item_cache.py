"""The item-tower cache of pre-ranking: per item, the pre-ranker's item
row (``ThreeTowerPreranker.item_cache_rows``: the item tower's output
carried through the upper layers' item block) and its category code.

Bounded: at most ``capacity`` items. Filled from the rows a full release
precomputed (``fill``); an item asked for and not held (born since the
release, or evicted) is a miss, and all misses of one request go through
the item tower in one batched call (``compute``). When the cache is full,
the least recently used eighth is evicted at once (recency is the number
of the last lookup that used an item), so that the fingerprint index is
rebuilt rarely: eviction costs O(capacity) once per ``capacity / 8``
insertions.

An ID the model does not know (``compute`` reports it unknown) is scored
as a cold item: slot 0 holds the cold row (default ID row, unknown
features), is never evicted, and unknown IDs are reported to the caller,
never cached (a later catalogue may know them) and never an error.

Lookups are vectorised: fingerprints (``freshtower.core.fingerprints``)
probe a numpy hash table, hits are gathered with one ``index_select`` into
the caller's buffer; Python touches only the misses. Counters (hits,
misses, cold, evictions) and the item tower's time feed ``/metrics``;
``on_timing(stage, seconds)`` is called with ``"item_tower"`` after each
batched miss computation. A lock makes lookups safe from several threads
(the caller's buffers are its own affair).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from freshtower.trainer.fingerprint_table import FingerprintTable
from freshtower.trainer.model import TowerInputs
from freshtower.trainer.prerank_model import ThreeTowerPreranker

from freshtower.core.fingerprints import fingerprint_strings

COLD_SLOT = 0


@dataclass(frozen=True)
class ComputedItems:
    """What the item tower made of a list of missed IDs."""

    known: np.ndarray  # (m,) bool: the model knows the ID (it has features)
    rows: torch.Tensor  # (known.sum(), H) float32 item rows of the known ones, in order
    codes: np.ndarray  # (known.sum(),) int64 their category codes


# distinct fingerprints of missed IDs -> what the item tower made of them
ComputeItems = Callable[[np.ndarray], ComputedItems]


@dataclass(frozen=True)
class ItemLookup:
    """One lookup's outcome (rows and codes are in the caller's buffers)."""

    hits: int  # candidates served from the cache
    misses: int  # candidates computed by the item tower
    cold: int  # candidates scored as cold items
    unknown_ids: list[str]  # the distinct unknown IDs, in order of first appearance
    item_tower_seconds: float


@dataclass(frozen=True)
class CacheStats:
    size: int
    capacity: int
    hits: int
    misses: int
    cold: int
    evictions: int
    item_tower_seconds: float

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses + self.cold
        return self.hits / looked_up if looked_up else 0.0


class CatalogueItems:
    """``compute`` for a cache over ``model``: the item-tower inputs of every
    catalogue item gathered once (a release's catalogue does not change), so
    that a miss costs a table probe and the item tower, nothing per item in
    Python. Items outside the catalogue are unknown."""

    def __init__(self, model: ThreeTowerPreranker):
        self._model = model
        self._ids = list(model.catalogue.ids)
        inputs = model.catalogue_inputs(np.arange(len(self._ids)))
        self._id_rows, self._categorical_rows = inputs.id_rows, inputs.categorical_rows
        column = model.item_categorical.index(model.prerank_config.category_feature)
        self._codes = inputs.categorical_rows[:, column].numpy().copy()

    def _rows(self, indices: np.ndarray) -> torch.Tensor:
        at = torch.from_numpy(indices)
        return self._model.item_cache_rows(TowerInputs(self._id_rows[at], self._categorical_rows[at], torch.zeros((len(indices), 0))))

    def __call__(self, fingerprints: np.ndarray) -> ComputedItems:
        indices = self._model.catalogue.indices_of_fingerprints(fingerprints)
        known = indices >= 0
        return ComputedItems(known, self._rows(indices[known]), self._codes[indices[known]])

    def everything(self) -> tuple[list[str], torch.Tensor, np.ndarray]:
        """(item IDs, rows (N, H), category codes (N,)) of the whole catalogue:
        what a full release precomputes and ``ItemTowerCache.fill`` takes."""
        return list(self._ids), self._rows(np.arange(len(self._ids))), self._codes.copy()


class ItemTowerCache:
    """Item rows by item ID, at most ``capacity`` of them, least recently used evicted.

    ``cold_row`` (H,) is the row of an unknown item; ``compute`` turns
    missed IDs into rows; ``clock`` (seconds) times it.
    """

    def __init__(
        self,
        capacity: int,
        cold_row: torch.Tensor,
        compute: ComputeItems,
        clock: Callable[[], float] = time.perf_counter,
        on_timing: Callable[[str, float], None] | None = None,
    ):
        if capacity < 1:
            raise ValueError(f"item cache capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.width = int(cold_row.shape[0])
        self._compute = compute
        self._clock = clock
        self._on_timing = on_timing
        self._lock = threading.Lock()
        self._rows = torch.empty((self.capacity + 1, self.width))
        self._rows[COLD_SLOT] = cold_row
        self._codes = np.zeros(self.capacity + 1, dtype=np.int64)
        self._keys = np.zeros(self.capacity + 1, dtype=np.uint64)  # 0: free
        self._last_used = np.zeros(self.capacity + 1, dtype=np.int64)
        self._free = np.arange(self.capacity, 0, -1, dtype=np.int64)  # popped from the end: slot 1 first
        self._free_count = self.capacity
        self._index = FingerprintTable(2 * self.capacity)
        self._tick = 0
        self._hits = self._misses = self._cold = self._evictions = 0
        self._item_tower_seconds = 0.0

    def __len__(self) -> int:
        return self.capacity - self._free_count

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self), self.capacity, self._hits, self._misses, self._cold, self._evictions, self._item_tower_seconds)

    def clear(self) -> None:
        """Forget every item (the cold row stays); counters are kept."""
        with self._lock:
            self._keys[:] = 0
            self._free = np.arange(self.capacity, 0, -1, dtype=np.int64)
            self._free_count = self.capacity
            self._index = FingerprintTable(2 * self.capacity)

    def fill(self, item_ids: Sequence[str], rows: torch.Tensor, codes: np.ndarray) -> int:
        """Store precomputed rows (a full release's), in order until full; pass
        the most wanted first. Returns how many were stored."""
        if rows.shape != (len(item_ids), self.width) or len(codes) != len(item_ids):
            raise ValueError(
                f"fill: {len(item_ids)} IDs, rows {tuple(rows.shape)} and {len(codes)} codes do not match (width {self.width})"
            )
        with self._lock:
            fingerprints = fingerprint_strings(item_ids)
            keys, first = np.unique(fingerprints, return_index=True)
            first = np.sort(first[self._index.get(keys) < 0])[: self._free_count]  # distinct, not held, in the given order
            self._insert(fingerprints[first], rows[torch.from_numpy(first)], np.asarray(codes)[first])
            return len(first)

    def lookup(
        self, item_ids: Sequence[str], out: torch.Tensor, codes_out: np.ndarray, fingerprints: np.ndarray | None = None
    ) -> ItemLookup:
        """Write the rows of ``item_ids`` into ``out`` (n, H) and their category
        codes into ``codes_out`` (n,); misses are computed in one call."""
        n = len(item_ids)
        if out.shape != (n, self.width) or codes_out.shape != (n,):
            raise ValueError(
                f"lookup of {n} items needs out ({n}, {self.width}) and codes_out ({n},), got {tuple(out.shape)}, {codes_out.shape}"
            )
        if fingerprints is None:
            fingerprints = fingerprint_strings(item_ids)
        with self._lock:
            self._tick += 1
            slots = self._index.get(fingerprints)  # (n,) -1: not held
            held = slots > 0
            slots[~held] = COLD_SLOT
            self._last_used[slots] = self._tick
            torch.index_select(self._rows, 0, torch.from_numpy(slots), out=out)
            np.take(self._codes, slots, out=codes_out)
            hits = int(np.count_nonzero(held))
            if hits == n:
                self._hits += hits
                return ItemLookup(hits, 0, 0, [], 0.0)
            missed = np.flatnonzero(~held)
            keys, first, inverse = np.unique(fingerprints[missed], return_index=True, return_inverse=True)  # distinct misses
            started = self._clock()
            computed = self._compute(keys)
            seconds = self._clock() - started
            known_count = int(np.count_nonzero(computed.known))
            if len(computed.known) != len(keys) or computed.rows.shape != (known_count, self.width):
                raise ValueError(f"item rows for {len(keys)} misses came back as {tuple(computed.rows.shape)} for {known_count} known")
            row_of = np.full(len(keys), -1, dtype=np.int64)
            row_of[computed.known] = np.arange(known_count)
            per_miss = row_of[inverse]
            known = per_miss >= 0
            if known_count:
                out[torch.from_numpy(missed[known])] = computed.rows[torch.from_numpy(per_miss[known])]
                codes_out[missed[known]] = computed.codes[per_miss[known]]
                self._insert(keys[computed.known], computed.rows, computed.codes)
            unknown_positions = missed[np.sort(first[~computed.known])]  # first appearances, in request order
            misses, cold = int(np.count_nonzero(known)), int(np.count_nonzero(~known))
            self._hits += hits
            self._misses += misses
            self._cold += cold
            self._item_tower_seconds += seconds
        if self._on_timing is not None:
            self._on_timing("item_tower", seconds)
        unknown = [item_ids[i] for i in unknown_positions.tolist()]
        return ItemLookup(hits, misses, cold, unknown, seconds)

    # --- slots (under the lock) ------------------------------------------------

    def _insert(self, keys: np.ndarray, rows: torch.Tensor, codes: np.ndarray) -> None:
        """Store distinct, not-held ``keys``; beyond capacity the first ones
        win (for misses: the smallest fingerprints, an arbitrary but fixed choice)."""
        keys, rows, codes = keys[: self.capacity], rows[: self.capacity], np.asarray(codes)[: self.capacity]
        if len(keys) == 0:
            return
        if self._free_count < len(keys):
            self._evict(max(len(keys) - self._free_count, self.capacity // 8))
        slots = self._free[self._free_count - len(keys) : self._free_count][::-1].copy()
        self._free_count -= len(keys)
        self._rows[torch.from_numpy(slots)] = rows
        self._codes[slots] = codes
        self._keys[slots] = keys
        self._last_used[slots] = self._tick
        self._index.put(keys, slots)

    def _evict(self, count: int) -> None:
        occupied = np.flatnonzero(self._keys)
        count = min(count, len(occupied))
        victims = occupied[np.argpartition(self._last_used[occupied], count - 1)[:count]] if count < len(occupied) else occupied
        self._keys[victims] = 0
        self._free[self._free_count : self._free_count + len(victims)] = victims
        self._free_count += len(victims)
        self._evictions += len(victims)
        kept = np.flatnonzero(self._keys)
        self._index.rebuild(self._keys[kept], kept)
