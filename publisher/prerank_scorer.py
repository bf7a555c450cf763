"""Pre-ranking one request: one user, n candidate item IDs -> n logits and
their order, the way COLD serves its three towers.

Per request: the user tower once; the item rows from the item cache (the
item tower only on misses, in one batch); the statistics features of every
(user, candidate) pair gathered from the published snapshots and encoded
(``freshtower.core.statistics``: the definitions and the encoding training
used); the cross tower and the upper layers over all n at once
(``CandidateScorer``: preallocated buffers, batched matmuls, no Python per
candidate). Each stage is timed (``STAGES``) for ``/metrics``.

Statistics at serving are those of the newest published snapshot (the full
release's, then each embeddings release's while a pre-ranker is served:
per item, per (user, category) and per user, ``publisher/statistics_feed.py``):
as of ``statistics_as_of_ms``, which lags the request by the publication
period and the stream's windows, where training used the statistics as of
each request's own minute. The (user, category) statistics are looked up by the category's
value in the model's vocabulary; an item whose category the model has not
seen reads the user's counts under the unknown category "".
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from freshtower.publisher.item_cache import ItemTowerCache
from freshtower.trainer.fingerprint_table import FingerprintTable
from freshtower.trainer.model import TowerInputs
from freshtower.trainer.prerank_model import ThreeTowerPreranker

from freshtower.core.fingerprints import fingerprint_strings
from freshtower.core.statistics import COUNT_COLUMNS, FEATURE_NAMES, HOUR, CountsSnapshot, encode_statistics, user_category_keys

STAGES = ("features", "user_tower", "item_tower", "cross_tower", "upper_layers", "sort")


class ItemStatisticsIndex:
    """A published per-item ``CountsSnapshot`` (keys: item ID fingerprints)
    in a hash table, for gathering n candidates' counts in a few array passes."""

    def __init__(self, snapshot: CountsSnapshot):
        k = len(snapshot.keys)
        self.as_of_ms = snapshot.as_of_ms
        self._table = FingerprintTable(2 * max(k, 1))
        if k:
            self._table.put(snapshot.keys, np.arange(k, dtype=np.int64))
        self._counts = np.zeros((k + 1, 4), dtype=np.float32)  # the last row: no counts
        self._counts[:k] = snapshot.counts.reshape(k, 4)

    def gather(self, fingerprints: np.ndarray, out: np.ndarray) -> None:
        """Write the (n, 4) item columns of ``COUNT_COLUMNS`` into ``out``."""
        rows = self._table.get(fingerprints)
        rows[rows < 0] = len(self._counts) - 1
        out[:] = self._counts[rows]


def top_order(scores: np.ndarray, keep: int | None = None) -> np.ndarray:
    """Positions of the ``keep`` best scores (all when None), best first;
    equal scores in their given order, exactly as a full stable sort would
    cut them, at O(n) plus a sort of the kept ones.

    >>> top_order(np.array([0.1, 0.9, 0.5, 0.9, 0.5]), keep=3).tolist()
    [1, 3, 2]
    """
    n = len(scores)
    if keep is None or keep >= n:
        return np.argsort(-scores, kind="stable")
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.partition(scores, n - keep)[n - keep]  # the keep-th largest
    above = np.flatnonzero(scores > threshold)
    tied = np.flatnonzero(scores == threshold)[: keep - len(above)]
    kept = np.concatenate([above, tied])
    return kept[np.lexsort((kept, -scores[kept]))]


@dataclass(frozen=True)
class PrerankScores:
    logits: np.ndarray  # (n,) float32, in candidate order
    order: np.ndarray  # (min(keep, n),) int64 candidate positions, best first (ties: earlier first)
    unknown_ids: list[str]  # candidates the model does not know, scored as cold items
    hits: int
    misses: int
    statistics_as_of_ms: int
    seconds: dict[str, float]  # per stage (STAGES)


class PrerankScorer:
    """Scores one user's candidates; not thread-safe (one per worker thread)."""

    def __init__(
        self,
        model: ThreeTowerPreranker,
        cache: ItemTowerCache,
        item_statistics: CountsSnapshot,
        user_statistics: tuple[CountsSnapshot, CountsSnapshot],
        max_candidates: int,
        clock: Callable[[], float] = time.perf_counter,
        on_timing: Callable[[str, float], None] | None = None,
    ):
        config = model.prerank_config
        self.max_candidates = int(max_candidates)
        self._user_tower = model.user_tower
        self._scorer = model.candidate_scorer(self.max_candidates)
        self._cache = cache
        self._items = ItemStatisticsIndex(item_statistics)
        self._by_category, self._by_user = user_statistics
        self._ctr = (config.ctr_prior, config.ctr_prior_strength)
        vocabulary = model.item_values[config.category_feature]
        self._category_values = ["" if v is None else v for v in vocabulary.row_ids()]  # code -> value
        self._clock = clock
        self._on_timing = on_timing
        self._codes = np.zeros(self.max_candidates, dtype=np.int64)
        self._counts = np.zeros((self.max_candidates, len(COUNT_COLUMNS)), dtype=np.float32)
        self._features = np.zeros((self.max_candidates, len(FEATURE_NAMES)), dtype=np.float32)

    def with_user_tower(self, user_tower) -> "PrerankScorer":
        """This scorer over another user tower (newer user ID rows): it shares
        the buffers, so it takes the same lock as this one."""
        other = copy.copy(self)
        other._user_tower = user_tower
        return other

    def with_statistics(self, item_statistics: CountsSnapshot, user_statistics: tuple[CountsSnapshot, CountsSnapshot]) -> "PrerankScorer":
        """This scorer over newer statistics snapshots: it shares the buffers,
        so it takes the same lock as this one."""
        other = copy.copy(self)
        other._items = ItemStatisticsIndex(item_statistics)
        other._by_category, other._by_user = user_statistics
        return other

    @property
    def statistics_as_of_ms(self) -> int:
        return min(self._items.as_of_ms, self._by_category.as_of_ms, self._by_user.as_of_ms)

    def _user_counts(self, user_id: str) -> tuple[np.ndarray, float]:
        """(codes, 4) the user's (user, category) counts by category code; the user's clicks in the last hour."""
        values = self._category_values
        by_category = self._by_category.lookup(user_category_keys([user_id] * len(values), values))  # (V, 2, 2)
        clicks = self._by_user.lookup(fingerprint_strings([user_id]))[0, HOUR, 0]
        return by_category.reshape(len(values), 4).astype(np.float32), float(clicks)

    def score(self, user_id: str, user_inputs: TowerInputs, candidate_ids: Sequence[str], keep: int | None = None) -> PrerankScores:
        """Logits of ``candidate_ids`` for one user (``user_inputs``: one row),
        and the order of the ``keep`` best (all when None)."""
        n = len(candidate_ids)
        if n > self.max_candidates:
            raise ValueError(f"{n} candidates exceed the maximum of {self.max_candidates}")
        clock = self._clock
        seconds = dict.fromkeys(STAGES, 0.0)
        started = clock()
        fingerprints = fingerprint_strings(candidate_ids)
        item_rows = self._scorer.item_rows_buffer(n)
        codes = self._codes[:n]
        lookup = self._cache.lookup(candidate_ids, item_rows, codes, fingerprints)
        counts = self._counts[:n]
        self._items.gather(fingerprints, counts[:, :4])
        user_category, user_clicks = self._user_counts(user_id)
        counts[:, 4:8] = user_category[codes]
        counts[:, 8] = user_clicks
        features = encode_statistics(counts, *self._ctr, out=self._features[:n])
        after_features = clock()
        seconds["item_tower"] = lookup.item_tower_seconds
        seconds["features"] = after_features - started - lookup.item_tower_seconds
        with torch.no_grad():
            user_row = self._scorer.user_row(self._user_tower(user_inputs)[0])
        after_user = clock()
        seconds["user_tower"] = after_user - after_features
        cross = self._scorer.cross(torch.from_numpy(features))
        after_cross = clock()
        seconds["cross_tower"] = after_cross - after_user
        logits = self._scorer.upper(user_row, item_rows, cross).numpy().copy()
        after_upper = clock()
        seconds["upper_layers"] = after_upper - after_cross
        order = top_order(logits, keep)
        seconds["sort"] = clock() - after_upper
        if self._on_timing is not None:
            for stage in STAGES:
                if stage != "item_tower":  # the cache reports its own
                    self._on_timing(stage, seconds[stage])
        return PrerankScores(logits, order, lookup.unknown_ids, lookup.hits, lookup.misses, self.statistics_as_of_ms, seconds)
