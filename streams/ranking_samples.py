"""Ranking samples and statistics rows from the join's finished requests.

A request is finished when its label-0 window closes (``ClosedWindow.requests``):
its impression, every joined click and its rank logs are known. Per closed
window, ``RankingSampleEmitter.emit`` gives

- one ``RankingSample`` per finished request with a rank log of the
  teacher stage: every candidate the ranker scored with its score and kept
  flag, shown, clicked, the user features and the per-user statistics of
  each (user, candidate) pair as of the request's time;
- the statistics rows the finished requests add (an impression per shown
  item at the impression's time, a click per joined click at its time; late
  ones at their effective time), which are written beside the batch so that
  every reader can sum every partition's item statistics, and a restarted
  worker rebuilds its user statistics from them (``restore``).

Why the statistics are those of the request's time: a request is finished
a join window after its impression; by then every request of an earlier
minute of this partition is finished too and its rows are counted, and
the rows of the request's own minute and later never count
(``freshtower.core.statistics``). Within a closed window, requests are
taken minute by minute: queried first, then counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from freshtower.streams.join import ClosedWindow

from freshtower.core.batches.ranking import USER_COUNT_COLUMNS, RankingSample
from freshtower.core.eventtime import MINUTE_MS
from freshtower.core.statistics import Interactions, UserStatistics, effective_time_ms


@dataclass(frozen=True)
class EmittedWindow:
    samples: list[RankingSample]
    rows: Interactions


def _empty_rows() -> Interactions:
    return Interactions([], [], [], np.zeros(0, np.int64), np.zeros(0, bool))


class RankingSampleEmitter:
    """The ranking samples and statistics rows of one input partition.

    ``category_feature``: the item feature that keys (user, category)
    statistics; ``teacher_stage``: the rank-log stage whose candidate list
    and scores a ranking sample holds; ``join_window_ms``: how long after its
    impression a request is finished (bounds what is kept)."""

    def __init__(self, category_feature: str, teacher_stage: str, join_window_ms: int, max_known_items: int = 1_000_000):
        self.category_feature = category_feature
        self.teacher_stage = teacher_stage
        self.join_window_ms = int(join_window_ms)
        self.statistics = UserStatistics()
        self._categories: dict[str, str] = {}  # item -> category, from impressions (candidates not shown have none)
        self._max_known_items = int(max_known_items)
        self.clamped = 0  # requests older than the counters' floor: their user counts read 0

    def restore(self, rows: Iterable[Interactions]) -> None:
        """Count rows written before a restart (the last day's, oldest first)."""
        for part in rows:
            self.statistics.add(part)
            for item_id, category in zip(part.item_ids, part.categories):
                self._remember(item_id, category)

    def _remember(self, item_id: str, category: str) -> None:
        if len(self._categories) >= self._max_known_items:
            self._categories.clear()
        self._categories[item_id] = category

    def _rows_of(self, state: dict) -> tuple[list, list, list, list, list]:
        impression = state["impression"]
        user = state["user"]
        # A late label-0 window: the impression counts where it would have, a join window before it.
        seen_ms = impression["ts"]
        if state.get("label0_late"):
            seen_ms = max(seen_ms, state["label0_window"] - self.join_window_ms)
        users, items, categories, times, clicked = [], [], [], [], []
        category_of = {}
        for item_id, (_, features) in impression["items"].items():
            category = str(features.get(self.category_feature, ""))
            category_of[item_id] = category
            self._remember(item_id, category)
            users.append(user)
            items.append(item_id)
            categories.append(category)
            times.append(seen_ms)
            clicked.append(False)
        for item_id, (ts, _, window, _) in state["clicks"].items():
            users.append(user)
            items.append(item_id)
            categories.append(category_of.get(item_id, ""))
            times.append(effective_time_ms(ts, window))
            clicked.append(True)
        return users, items, categories, times, clicked

    def _sample(self, request_id: str, state: dict) -> RankingSample | None:
        rank = state["rank"]
        lists = (rank or {}).get("lists", {})
        if self.teacher_stage not in lists or state["impression"] is None:
            return None
        candidates, scores, kept = lists[self.teacher_stage]
        impression = state["impression"]
        shown_items = impression["items"]
        categories = []
        for item_id in candidates:
            if item_id in shown_items:
                categories.append(str(shown_items[item_id][1].get(self.category_feature, "")))
            else:
                categories.append(self._categories.get(item_id, ""))
        as_of = impression["ts"]
        try:
            counts = self.statistics.counts([state["user"]] * len(candidates), categories, as_of)
        except ValueError:  # older than the floor: a request finished very late
            self.clamped += 1
            counts = np.zeros((len(candidates), len(USER_COUNT_COLUMNS)), dtype=np.int64)
        clicks = state["clicks"]
        return RankingSample(
            request_id=request_id,
            user_id=state["user"],
            event_time_ms=int(as_of),
            stage=self.teacher_stage,
            candidate_ids=tuple(candidates),
            scores=tuple(float(s) for s in scores),
            kept=tuple(bool(k) for k in kept),
            shown=tuple(i in shown_items for i in candidates),
            clicked=tuple(i in clicks for i in candidates),
            categories=tuple(categories),
            user_counts=counts,
            user_categorical=dict(impression["user_categorical"]),
            user_numeric=dict(impression["user_numeric"]),
        )

    def emit(self, window: ClosedWindow) -> EmittedWindow:
        finished = [(rid, state) for rid, state in window.requests if state.get("impression") is not None]
        finished.sort(key=lambda pair: (pair[1]["impression"]["ts"], pair[0]))
        samples: list[RankingSample] = []
        columns: tuple[list, ...] = ([], [], [], [], [])
        start = 0
        while start < len(finished):
            minute = finished[start][1]["impression"]["ts"] // MINUTE_MS
            stop = start
            while stop < len(finished) and finished[stop][1]["impression"]["ts"] // MINUTE_MS == minute:
                stop += 1
            group = finished[start:stop]
            for request_id, state in group:  # queried before this minute's rows count
                sample = self._sample(request_id, state)
                if sample is not None:
                    samples.append(sample)
            added: tuple[list, ...] = ([], [], [], [], [])
            for _, state in group:
                for column, values in zip(added, self._rows_of(state)):
                    column.extend(values)
            if added[0]:
                rows = Interactions(added[0], added[1], added[2], np.asarray(added[3], np.int64), np.asarray(added[4], bool))
                self.statistics.add(rows)
                for column, values in zip(columns, added):
                    column.extend(values)
            start = stop
        # No request finished later is older than a join window before this window (late ones are clamped).
        self.statistics.advance(max(0, window.start_ms - self.join_window_ms - MINUTE_MS))
        rows = (
            Interactions(columns[0], columns[1], columns[2], np.asarray(columns[3], np.int64), np.asarray(columns[4], bool))
            if columns[0]
            else _empty_rows()
        )
        return EmittedWindow(samples, rows)
