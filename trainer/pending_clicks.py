"""Clicks of users who do not have an ID row yet, held until they do.

The frequency filter (``IdVocabulary(min_count=2)``) gives a user a row on
their second click; until then they read the shared default row, which the
online trainer never moves. Without more, the click that started the count
would teach the row nothing: online, a new user's first click would be
lost. ``PendingClicks`` keeps those clicks (at most ``min_count - 1`` per
user, and ``capacity`` in all, the oldest dropped first) and hands them back
in the minibatch that admits their user, so the new row learns from every
click that admitted it. Admission still guards memory: the buffer is
bounded, the table only grows for admitted users.

The full trainer does not need this: it counts the whole day's sightings
before it trains, so a row admitted anywhere in the day learns all of it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from freshtower.core.batches import FeatureSpec, SampleColumns


class PendingClicks:
    """A bounded FIFO of clicks by user fingerprint.

    >>> pending = PendingClicks(capacity=10, spec=FeatureSpec())
    >>> len(pending)
    0
    """

    def __init__(self, capacity: int, spec: FeatureSpec):
        if capacity < 0:
            raise ValueError(f"pending click capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.spec = spec
        self._chunks: OrderedDict[int, SampleColumns] = OrderedDict()  # arrival order
        self._by_user: dict[int, list[tuple[int, int]]] = {}  # user fingerprint -> [(chunk, row)]
        self._live: dict[int, int] = {}  # chunk -> clicks still held
        self._next_chunk = 0
        self._held = 0

    def __len__(self) -> int:
        return self._held

    def users(self) -> int:
        return len(self._by_user)

    def hold_and_release(self, positives: SampleColumns, rows: np.ndarray, admitted_rows: np.ndarray) -> SampleColumns | None:
        """One minibatch's exchange with the buffer.

        ``positives`` are the minibatch's clicks after their sightings were
        counted, ``rows`` (B,) their users' ID rows (0: not admitted), and
        ``admitted_rows`` the rows this minibatch admitted. Returns the held
        clicks of the users admitted now, in arrival order (None if none),
        for the caller to learn with ``positives``; holds the clicks of
        users still without a row.
        """
        released = self._release(positives, rows, admitted_rows)
        if self.capacity:
            waiting = np.flatnonzero(rows == 0)
            if len(waiting):
                waiting = np.asarray([i for i in waiting.tolist() if positives.user_ids[i]], dtype=np.int64)  # "" never gets a row
            if len(waiting):
                self._hold(positives.take(waiting))
        return released

    def _release(self, positives: SampleColumns, rows: np.ndarray, admitted_rows: np.ndarray) -> SampleColumns | None:
        if not self._by_user or len(admitted_rows) == 0:
            return None
        admitted = np.flatnonzero(np.isin(rows, admitted_rows))
        if len(admitted) == 0:
            return None
        fingerprints = positives.user_id_fingerprints()[admitted]
        entries = []
        for fingerprint in np.unique(fingerprints).tolist():
            held = self._by_user.pop(fingerprint, None)
            if held:
                entries.extend(held)
        if not entries:
            return None
        return self._collect(entries)

    def _collect(self, entries: list[tuple[int, int]]) -> SampleColumns:
        """The held clicks at ``entries``, in arrival order, removed from the buffer."""
        entries.sort()
        parts = []
        start = 0
        while start < len(entries):
            chunk = entries[start][0]
            stop = start
            while stop < len(entries) and entries[stop][0] == chunk:
                stop += 1
            parts.append(self._chunks[chunk].take([row for _, row in entries[start:stop]]))
            self._live[chunk] -= stop - start
            self._held -= stop - start
            if self._live[chunk] == 0:
                del self._chunks[chunk], self._live[chunk]
            start = stop
        return SampleColumns.concat(parts, self.spec)

    def _hold(self, clicks: SampleColumns) -> None:
        chunk = self._next_chunk
        self._next_chunk += 1
        self._chunks[chunk] = clicks
        self._live[chunk] = len(clicks)
        self._held += len(clicks)
        for row, fingerprint in enumerate(clicks.user_id_fingerprints().tolist()):
            self._by_user.setdefault(fingerprint, []).append((chunk, row))
        while self._held > self.capacity:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        chunk, clicks = self._chunks.popitem(last=False)
        self._held -= self._live.pop(chunk)
        for fingerprint in set(clicks.user_id_fingerprints().tolist()):
            held = self._by_user.get(fingerprint)
            if held is None:
                continue
            kept = [entry for entry in held if entry[0] != chunk]
            if kept:
                self._by_user[fingerprint] = kept
            else:
                del self._by_user[fingerprint]

    def rebase(self, rows_of, replay_from_ms: int) -> int:
        """Keep what a fork onto a new full model leaves pending: forget the
        clicks of users who have a row there (``rows_of``: user fingerprints
        -> rows, 0 for none; the full model learnt those clicks into it) and
        the clicks at or after ``replay_from_ms``, where the trainer starts
        again (it will see them again). Returns how many were dropped."""
        held = self.held_clicks()
        if not len(held):
            return 0
        keep = (np.asarray(rows_of(held.user_id_fingerprints())) == 0) & (held.event_time_ms < replay_from_ms)
        self._chunks.clear()
        self._by_user.clear()
        self._live.clear()
        self._held = 0
        if keep.any():
            self._hold(held.take(np.flatnonzero(keep)))
        return int(len(held) - keep.sum())

    # --- persistence (plain lists and tensors: loads with weights_only) -------

    def held_clicks(self) -> SampleColumns:
        """Every held click, in arrival order (the buffer is unchanged)."""
        entries = sorted(entry for held in self._by_user.values() for entry in held)
        parts = []
        for chunk in dict.fromkeys(c for c, _ in entries):
            parts.append(self._chunks[chunk].take([row for c, row in entries if c == chunk]))
        return SampleColumns.concat(parts, self.spec)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "clicks": _columns_to_plain(self.held_clicks())}

    @classmethod
    def from_state_dict(cls, state: dict, spec: FeatureSpec, capacity: int | None = None) -> "PendingClicks":
        pending = cls(int(state["capacity"]) if capacity is None else capacity, spec)
        clicks = _columns_from_plain(state["clicks"])
        if len(clicks):
            pending._hold(clicks)
        return pending


def _columns_to_plain(columns: SampleColumns) -> dict:
    return {
        "user_ids": list(columns.user_ids),
        "item_ids": list(columns.item_ids),
        "labels": torch.from_numpy(np.ascontiguousarray(columns.labels)),
        "event_time_ms": torch.from_numpy(np.ascontiguousarray(columns.event_time_ms)),
        "request_ids": list(columns.request_ids),
        "positions": torch.from_numpy(np.ascontiguousarray(columns.positions)),
        "user_categorical": {k: list(v) for k, v in columns.user_categorical.items()},
        "user_numeric": torch.from_numpy(np.ascontiguousarray(columns.user_numeric)),
        "item_categorical": {k: list(v) for k, v in columns.item_categorical.items()},
        "hard_negative_flat": list(columns.hard_negative_flat),
        "hard_negative_offsets": torch.from_numpy(np.ascontiguousarray(columns.hard_negative_offsets)),
        "teacher_scores": torch.from_numpy(np.ascontiguousarray(columns.teacher_scores)),
    }


def _columns_from_plain(plain: dict) -> SampleColumns:
    return SampleColumns(
        user_ids=list(plain["user_ids"]),
        item_ids=list(plain["item_ids"]),
        labels=plain["labels"].numpy().copy(),
        event_time_ms=plain["event_time_ms"].numpy().copy(),
        request_ids=list(plain["request_ids"]),
        positions=plain["positions"].numpy().copy(),
        user_categorical={k: list(v) for k, v in plain["user_categorical"].items()},
        user_numeric=plain["user_numeric"].numpy().copy(),
        item_categorical={k: list(v) for k, v in plain["item_categorical"].items()},
        hard_negative_flat=list(plain["hard_negative_flat"]),
        hard_negative_offsets=plain["hard_negative_offsets"].numpy().copy(),
        teacher_scores=plain["teacher_scores"].numpy().copy(),
    )
