"""The experiment's baselines: retrieval without a model.

- ``popular/day``: the items clicked most in the 24 hours before the
  request, counting only clicks whose batch was ready by then (its window
  closed and the allowed lateness passed: what a counter fed by the same
  batches would know);
- ``popular/hour``: the same over the last hour;
- ``random``: K items drawn uniformly from those clicked so far (in a ready
  batch), fresh for every unit.

Every user gets the same popular list (no personalisation); ties go to the
item seen first. ``baseline_scores`` scores every unit with ``score_unit``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from freshtower.app.experiment_units import Unit, UnitScore, score_unit
from freshtower.core.batches import BatchRef, FeatureSpec, SampleColumns, read_batch
from freshtower.core.eventtime import DAY_MS, HOUR_MS

BASELINES = ("popular/day", "popular/hour", "random")
_SPANS = {"popular/day": DAY_MS, "popular/hour": HOUR_MS}


class _ItemIndex:
    def __init__(self):
        self.ids: list[str] = []
        self.index: dict[str, int] = {}

    def of(self, item: str) -> int:
        n = self.index.get(item)
        if n is None:
            n = self.index[item] = len(self.ids)
            self.ids.append(item)
        return n


def top_counted(counts: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest counts, largest first, ties to the lower index; zero counts left out.

    >>> top_counted(np.array([1, 5, 0, 5, 2]), 3).tolist()
    [1, 3, 4]
    """
    positive = np.flatnonzero(counts > 0)
    order = np.lexsort((positive, -counts[positive]))
    return positive[order[:k]]


def baseline_scores(
    refs: Sequence[BatchRef],
    spec: FeatureSpec,
    units: Sequence[Unit],
    ks: tuple[int, ...],
    lateness_ms: int,
    seed: int = 0,
    clicks: dict[str, SampleColumns] | None = None,
) -> dict[str, list[UnitScore]]:
    """Each baseline's score of every unit (in ``units``' order, which is time order); ``clicks``: each batch's clicked
    samples by path where decoded already."""
    clicks = clicks if clicks is not None else {}
    k = max(ks)
    items = _ItemIndex()
    ready = sorted(refs, key=lambda r: r.manifest.window_end_ms)
    windows: dict[str, deque[tuple[int, int]]] = {name: deque() for name in _SPANS}  # (click ms, item) in the span
    counts = {name: np.zeros(0, np.int64) for name in _SPANS}
    tops: dict[str, list[str] | None] = {name: None for name in _SPANS}
    rng = np.random.default_rng([seed, 7])
    scores: dict[str, list[UnitScore]] = {name: [] for name in BASELINES}
    next_ref = 0
    for unit in units:
        now = unit.time_ms
        while next_ref < len(ready) and ready[next_ref].manifest.window_end_ms + lateness_ms <= now:
            ref = ready[next_ref]
            samples = clicks.get(str(ref.path)) or read_batch(ref, spec)
            next_ref += 1
            indices = np.array([items.of(i) for i in samples.item_ids], dtype=np.int64)
            order = np.argsort(samples.event_time_ms, kind="stable")
            for name in _SPANS:
                if len(counts[name]) < len(items.ids):
                    counts[name] = np.concatenate([counts[name], np.zeros(len(items.ids) - len(counts[name]), np.int64)])
                np.add.at(counts[name], indices[order], 1)
                windows[name].extend(zip(samples.event_time_ms[order].tolist(), indices[order].tolist()))
                tops[name] = None
        for name, span in _SPANS.items():
            window = windows[name]
            while window and window[0][0] < now - span:
                counts[name][window.popleft()[1]] -= 1
                tops[name] = None
            if tops[name] is None:
                tops[name] = [items.ids[i] for i in top_counted(counts[name], k).tolist()]
            scores[name].append(score_unit(tops[name], unit, ks))
        seen = len(items.ids)
        drawn = rng.choice(seen, size=min(k, seen), replace=False) if seen else np.zeros(0, np.int64)
        scores["random"].append(score_unit([items.ids[i] for i in drawn.tolist()], unit, ks))
    return scores
