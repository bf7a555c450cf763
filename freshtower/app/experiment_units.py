"""The experiment's evaluation units and how one retrieval is scored.

A *unit* is one user's clicks in one hour, scored when the user first
clicks in that hour (``units_from``). Each unit knows whether its user was
first seen that day (a *new user*: the stream's first sample of the user
falls on the unit's day) and which of its clicked items were first seen
that day (*items born that day*), for the cold-start split.

``score_unit`` turns one retrieved list (item IDs, best first) into a
``UnitScore``: Recall@K for each K (``trainer.metrics``'s definition: the
share of the unit's clicked items in the top K), and the hits among the
clicks on items born that day and on older items, which are summed over
units into a recall per click.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from freshtower.core.batches import BatchRef, FeatureSpec, SampleColumns, read_batch
from freshtower.core.eventtime import DAY_MS, HOUR_MS, floor_ms


@dataclass
class Unit:
    """One user's clicks in one hour, scored at the user's first click."""

    time_ms: int
    hour_ms: int
    user_id: str
    categorical: dict[str, str]
    numeric: np.ndarray
    clicked: set[str]
    seen: frozenset[str] = frozenset()  # items the user clicked before this hour
    new_user: bool = False  # the user's first sample falls on this unit's day
    born_today: set[str] = field(default_factory=set)  # clicked items first seen on this unit's day
    index: int = -1  # position in time order


@dataclass(frozen=True)
class UnitScore:
    recall: dict[int, float]  # K -> Recall@K of the unit
    new_item_hits: dict[int, int]  # K -> clicks on items born that day found in the top K
    old_item_hits: dict[int, int]
    new_item_clicks: int
    old_item_clicks: int


def units_from(refs: list[BatchRef], spec: FeatureSpec, start_ms: int, clicks: dict[str, SampleColumns] | None = None) -> list[Unit]:
    """(user, hour) evaluation units of the clicks from ``start_ms`` on,
    each with the items its user clicked in earlier hours and its
    cold-start flags (first seen: the first sample, clicked or only shown).
    ``clicks``, when given, receives each batch's clicked samples (by path),
    so that the replay decodes every batch once."""
    units: dict[tuple[str, int], Unit] = {}
    history: dict[str, set[str]] = {}  # user -> items clicked in hours before the current one
    first_user: dict[str, int] = {}  # user -> time of their first sample (click or not)
    first_item: dict[str, int] = {}
    pending: list[tuple[str, str]] = []  # this hour's clicks, added to history when the hour ends
    hour = None
    for ref in refs:  # in window order, so samples arrive in time order up to a window
        samples = read_batch(ref, spec, positives_only=False)  # impressions too: when a user or item is first seen
        if clicks is not None:
            clicks[str(ref.path)] = samples.take(np.flatnonzero(samples.labels == 1))
        for i in np.argsort(samples.event_time_ms, kind="stable").tolist():
            t = int(samples.event_time_ms[i])
            user, item = samples.user_ids[i], samples.item_ids[i]
            first_user.setdefault(user, t)
            first_item.setdefault(item, t)
            if not samples.labels[i]:
                continue
            if hour != floor_ms(t, HOUR_MS):
                for u, it in pending:
                    history.setdefault(u, set()).add(it)
                pending, hour = [], floor_ms(t, HOUR_MS)
            pending.append((user, item))
            if t < start_ms:
                continue
            key = (user, hour)
            unit = units.get(key)
            day = floor_ms(t, DAY_MS)
            if unit is None:
                unit = units[key] = Unit(
                    t, hour, user, {k: v[i] for k, v in samples.user_categorical.items()}, samples.user_numeric[i].copy(), set(),
                    frozenset(history.get(user, ())), new_user=floor_ms(first_user[user], DAY_MS) == day,
                )
            unit.clicked.add(item)
            if floor_ms(first_item[item], DAY_MS) == day:
                unit.born_today.add(item)
    ordered = sorted(units.values(), key=lambda u: u.time_ms)
    for n, unit in enumerate(ordered):
        unit.index = n
    return ordered


def score_unit(retrieved: Sequence[str], unit: Unit, ks: tuple[int, ...]) -> UnitScore:
    """One unit's scores from its retrieved item IDs (best first, at least max(ks) long where the catalogue allows).

    >>> u = Unit(0, 0, "u", {}, np.zeros(0), {"a", "b", "n"}, born_today={"n"})
    >>> s = score_unit(["n", "x", "a"], u, (1, 3))
    >>> round(s.recall[1], 3), round(s.recall[3], 3), s.new_item_hits, s.old_item_hits, s.new_item_clicks
    (0.333, 0.667, {1: 1, 3: 1}, {1: 0, 3: 1}, 1)
    """
    new, old = unit.born_today, unit.clicked - unit.born_today
    recall, new_hits, old_hits = {}, {}, {}
    for k in ks:
        top = set(retrieved[:k])
        hits_new, hits_old = len(top & new), len(top & old)
        recall[k] = (hits_new + hits_old) / len(unit.clicked) if unit.clicked else 0.0
        new_hits[k], old_hits[k] = hits_new, hits_old
    return UnitScore(recall, new_hits, old_hits, len(new), len(old))
