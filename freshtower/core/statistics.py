"""Statistics features: windowed impression and click counts by event time,
the cross tower's inputs (``trainer/prerank_model.py``). One definition for
the stream that stores them with ranking samples, the trainers that read
them, and the service that scores with them.

Definitions (all times are event-time milliseconds since the epoch, UTC)
------------------------------------------------------------------------
Time is cut into minute buckets ``[k * 60 s, (k + 1) * 60 s)`` and hour
buckets ``[j * 3600 s, (j + 1) * 3600 s)``. For a request at time ``t``
let ``M = t - t % 60 s`` (its minute's start) and ``H = t - t % 3600 s``
(its hour's start). Then, counting only events at times ``s`` with

- **last hour**: ``M - 3600 s <= s < M`` (the 60 whole minutes before the
  request's minute), and
- **last day**: ``H - 23 h <= s < M`` (the request's hour up to its minute,
  and the 23 whole hours before it: between 23 h and 24 h long),

the statistics of a candidate item ``i`` for user ``u`` are (``COUNT_COLUMNS``):

- the item's impressions and clicks in the last hour and the last day;
- the user's impressions and clicks on items of ``i``'s category
  (``PrerankConfig.category_feature``) in the last hour and the last day;
- the user's clicks in the last hour.

An impression counts once per shown item, at the impression's time; a
click counts at the click's time once it has joined its impression (which
gives its category); a duplicate counts once (the stream deduplicates).
The request's own minute never counts, so a request never sees itself,
nor anything at or after its time: no leakage from the future, and the
result does not depend on the order of events within a minute. A late
event, one the stream put into a later window than its own, counts at
``effective_time_ms``: the start of the window it was assigned, a little
later than it happened, never earlier.

Bounded memory: ``WindowedCounts`` keeps, per 64-bit key, counts in the
minute buckets of the last hour and the hour buckets of the last day
before its answerable floor (``advance``), and nothing older.

Items across partitions
-----------------------
The streams worker partitions events by user, so one partition sees every
event of its users (per-user statistics are exact there: ``UserStatistics``)
but only its users' share of an item's events. Each partition therefore
emits, per minute bucket, the per-item counts it saw (``ItemCountDelta``,
``item_count_deltas``), written beside its batches. An item's statistics as
of minute ``M`` are a pure function of the deltas of every partition for
the minutes before ``M`` (``ItemStatistics.apply`` then ``snapshot``).
Addition commutes, so the order in which partitions' deltas arrive does not
matter, and deltas of minutes at or after ``M`` never count: a reader
(the trainer filling a ranking sample's item statistics, the publisher
writing the per-item statistics that serving reads) gets the same numbers
once every partition's windows up to ``M`` are closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from freshtower.core.eventtime import HOUR_MS, MINUTE_MS
from freshtower.core.fingerprints import fingerprint_strings

HOUR_MINUTES = 60  # minute buckets in the last-hour window
DAY_HOURS = 23  # whole hour buckets in the last-day window, before the request's hour

IMPRESSIONS, CLICKS = 0, 1  # channels of an (impressions, clicks) counter
HOUR, DAY = 0, 1  # windows

COUNT_COLUMNS = (
    "item_impressions_1h",
    "item_clicks_1h",
    "item_impressions_1d",
    "item_clicks_1d",
    "user_category_impressions_1h",
    "user_category_clicks_1h",
    "user_category_impressions_1d",
    "user_category_clicks_1d",
    "user_clicks_1h",
)
FEATURE_NAMES = tuple(f"log1p_{c}" for c in COUNT_COLUMNS) + (
    "item_ctr_1h",
    "item_ctr_1d",
    "user_category_ctr_1h",
    "user_category_ctr_1d",
)
# (clicks, impressions) columns of each smoothed CTR, in FEATURE_NAMES order
_CTR_COLUMNS = ((1, 0), (3, 2), (5, 4), (7, 6))


def hour_window(t_ms: int) -> tuple[int, int]:
    """``[start, end)`` of the last-hour window of a request at ``t_ms``.

    >>> hour_window(7_230_000)  # 02:00:30 -> [01:00, 02:00)
    (3600000, 7200000)
    """
    minute = t_ms - t_ms % MINUTE_MS
    return minute - HOUR_MS, minute


def day_window(t_ms: int) -> tuple[int, int]:
    """``[start, end)`` of the last-day window of a request at ``t_ms``.

    >>> day_window(90_030_000)  # day 1, 01:00:30 -> [day 0 02:00, day 1 01:00)
    (7200000, 90000000)
    """
    return t_ms - t_ms % HOUR_MS - DAY_HOURS * HOUR_MS, t_ms - t_ms % MINUTE_MS


def effective_time_ms(event_ms: np.ndarray | int, assigned_window_start_ms: np.ndarray | int) -> np.ndarray | int:
    """When an event counts: its own time, or the start of the later window
    the stream assigned it to when its own had closed.

    >>> effective_time_ms(125_000, 120_000), effective_time_ms(125_000, 180_000)
    (125000, 180000)
    >>> effective_time_ms(np.array([125_000, 125_000]), np.array([120_000, 180_000])).tolist()
    [125000, 180000]
    """
    if np.ndim(event_ms) == 0 and np.ndim(assigned_window_start_ms) == 0:
        return max(int(event_ms), int(assigned_window_start_ms))
    return np.maximum(event_ms, assigned_window_start_ms)


def user_category_keys(user_ids: Sequence[str], categories: Sequence[str]) -> np.ndarray:
    """64-bit keys of (user, category) pairs. IDs never hold NUL (the event
    validation refuses control characters), so the joined string is unique."""
    return fingerprint_strings([f"{u}\x00{c}" for u, c in zip(user_ids, categories)])


# --- bucketed counts -------------------------------------------------------------------


class _Bucket:
    """Counts of one time bucket: sorted unique keys and their counts,
    with additions queued and merged when read."""

    def __init__(self, channels: int):
        self.keys = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros((0, channels), dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self._pending.append((keys, counts))
        if len(self._pending) > 64:
            self.merged()

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pending:
            self.keys, self.counts = _sum_by_key(
                np.concatenate([self.keys, *(k for k, _ in self._pending)]),
                np.concatenate([self.counts, *(c for _, c in self._pending)]),
            )
            self._pending = []
        return self.keys, self.counts


def _sum_by_key(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and the summed rows of ``counts`` (n, ...) per key."""
    if len(keys) == 0:
        return keys, counts
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.add.reduceat(counts, starts, axis=0)


@dataclass(frozen=True)
class CountsSnapshot:
    """Hour and day counts of every key with any, as of one time: what a
    reader looks candidates up in (and what is published for serving)."""

    as_of_ms: int
    keys: np.ndarray  # (k,) uint64, sorted
    counts: np.ndarray  # (k, 2, C) int64: window (HOUR, DAY) x channel

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """(n, 2, C) counts of ``keys`` (zeros for keys without any)."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.zeros((len(keys),) + self.counts.shape[1:], dtype=np.int64)
        if len(self.keys) == 0 or len(keys) == 0:
            return out
        positions = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[positions] == keys
        out[found] = self.counts[positions[found]]
        return out


class WindowedCounts:
    """Counts per 64-bit key and channel in minute and hour buckets of event
    time; answers "last hour" and "last day" as of any time at or after its
    floor, exactly as the module docstring defines them.

    Memory: the minute buckets from ``floor - 60 min`` and the hour buckets
    from ``floor's hour - 23 h`` on, each holding the keys counted in it.
    ``advance`` moves the floor (the caller promises no query before it);
    an addition too old to count in any query at or after the floor is
    dropped, which changes no answer (counted in ``dropped``).

    >>> counts = WindowedCounts(channels=1)
    >>> key = np.array([7], dtype=np.uint64)
    >>> for t in (0, 59_999, 60_000):  # two in minute 0, one in minute 1
    ...     counts.add(key, np.array([t]), np.array([[1]]))
    >>> counts.snapshot(60_000).lookup(key)[:, HOUR, 0].tolist()  # minute 1 is the request's own
    [2]
    >>> counts.snapshot(120_000).lookup(key)[:, HOUR, 0].tolist()
    [3]
    """

    def __init__(self, channels: int):
        self.channels = int(channels)
        self._minutes: dict[int, _Bucket] = {}
        self._hours: dict[int, _Bucket] = {}
        self._floor_minute: int | None = None
        self.dropped = 0
        self._changes = 0  # bumps on every change; a cached snapshot is valid while it holds
        self._cached: tuple[int, int, CountsSnapshot] | None = None

    @property
    def floor_ms(self) -> int | None:
        """The earliest time a query may ask about (None: any)."""
        return None if self._floor_minute is None else self._floor_minute * MINUTE_MS

    def buckets(self) -> tuple[int, int]:
        """(minute buckets, hour buckets) held."""
        return len(self._minutes), len(self._hours)

    def add(self, keys: np.ndarray, time_ms: np.ndarray, counts: np.ndarray) -> None:
        """Count ``counts`` (n, C) for ``keys`` (n,) at event times ``time_ms`` (n,)."""
        keys = np.asarray(keys, dtype=np.uint64)
        time_ms = np.asarray(time_ms, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64).reshape(len(keys), self.channels)
        if len(keys) == 0:
            return
        if np.any(time_ms < 0):
            raise ValueError(f"statistics times must be >= 0 ms, got {int(time_ms.min())}")
        minutes = time_ms // MINUTE_MS
        hours = minutes // HOUR_MINUTES
        keep_minute = np.ones(len(keys), dtype=bool)
        keep_hour = keep_minute
        if self._floor_minute is not None:
            keep_minute = minutes >= self._floor_minute - HOUR_MINUTES
            keep_hour = hours >= self._floor_minute // HOUR_MINUTES - DAY_HOURS
            self.dropped += int(np.count_nonzero(~keep_minute & ~keep_hour))
        for buckets, index, keep in ((self._minutes, minutes, keep_minute), (self._hours, hours, keep_hour)):
            kept = np.flatnonzero(keep)
            index = index[kept]
            for value in np.unique(index).tolist():
                at = kept[index == value]
                bucket = buckets.get(value)
                if bucket is None:
                    bucket = buckets[value] = _Bucket(self.channels)
                bucket.add(keys[at], counts[at])
        self._changes += 1

    def advance(self, floor_ms: int) -> None:
        """Promise no query before ``floor_ms``; drop the buckets no later query needs."""
        floor_minute = int(floor_ms) // MINUTE_MS
        if self._floor_minute is not None and floor_minute <= self._floor_minute:
            return
        self._floor_minute = floor_minute
        oldest_minute = floor_minute - HOUR_MINUTES
        oldest_hour = floor_minute // HOUR_MINUTES - DAY_HOURS
        for minute in [m for m in self._minutes if m < oldest_minute]:
            del self._minutes[minute]
        for hour in [h for h in self._hours if h < oldest_hour]:
            del self._hours[hour]
        self._changes += 1

    def _as_of_minute(self, as_of_ms: int) -> int:
        minute = int(as_of_ms) // MINUTE_MS
        if self._floor_minute is not None and minute < self._floor_minute:
            raise ValueError(
                f"statistics as of {int(as_of_ms)} ms precede the floor {self.floor_ms} ms: those buckets were dropped by advance()"
            )
        return minute

    def _window_buckets(self, minute: int):
        """(bucket, counts in the hour window, in the day window) of every
        bucket a request in ``minute`` reads."""
        hour = minute // HOUR_MINUTES
        for m in range(minute - HOUR_MINUTES, minute):
            bucket = self._minutes.get(m)
            if bucket is not None:
                yield bucket, True, m >= hour * HOUR_MINUTES  # the request's hour so far belongs to the day too
        for h in range(hour - DAY_HOURS, hour):
            bucket = self._hours.get(h)
            if bucket is not None:
                yield bucket, False, True

    def lookup(self, keys: np.ndarray, as_of_ms: int) -> np.ndarray:
        """(n, 2, C) hour and day counts of ``keys`` as of ``as_of_ms``, read
        bucket by bucket (cheaper than a snapshot for a few keys)."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.zeros((len(keys), 2, self.channels), dtype=np.int64)
        for bucket, in_hour, in_day in self._window_buckets(self._as_of_minute(as_of_ms)):
            bucket_keys, counts = bucket.merged()
            if len(bucket_keys) == 0 or len(keys) == 0:
                continue
            positions = np.minimum(np.searchsorted(bucket_keys, keys), len(bucket_keys) - 1)
            found = np.flatnonzero(bucket_keys[positions] == keys)
            if in_hour:
                out[found, HOUR] += counts[positions[found]]
            if in_day:
                out[found, DAY] += counts[positions[found]]
        return out

    def snapshot(self, as_of_ms: int) -> CountsSnapshot:
        """Hour and day counts of every key as of a request at ``as_of_ms``."""
        as_of_ms = int(as_of_ms)
        minute = self._as_of_minute(as_of_ms)
        if self._cached is not None and self._cached[:2] == (self._changes, minute):
            return self._cached[2]
        key_parts, count_parts = [], []
        for bucket, in_hour, in_day in self._window_buckets(minute):
            keys, counts = bucket.merged()
            both = np.zeros((len(keys), 2, self.channels), dtype=np.int64)
            if in_hour:
                both[:, HOUR] = counts
            if in_day:
                both[:, DAY] = counts
            key_parts.append(keys)
            count_parts.append(both)
        if key_parts:
            keys, counts = _sum_by_key(np.concatenate(key_parts), np.concatenate(count_parts))
        else:
            keys, counts = np.zeros(0, dtype=np.uint64), np.zeros((0, 2, self.channels), dtype=np.int64)
        snapshot = CountsSnapshot(as_of_ms, keys, counts)
        self._cached = (self._changes, minute, snapshot)
        return snapshot


# --- what the stream counts ----------------------------------------------------------------


@dataclass(frozen=True)
class Interactions:
    """What statistics count, one row per shown item (an impression of it)
    or per joined click. ``time_ms`` is the effective time (``effective_time_ms``)."""

    user_ids: Sequence[str]
    item_ids: Sequence[str]
    categories: Sequence[str]  # the item's category ("" unknown: counted under "")
    time_ms: np.ndarray  # (n,) int64
    clicked: np.ndarray  # (n,) bool: a click (True) or an impression (False)

    def __post_init__(self):
        n = len(self.user_ids)
        if not (len(self.item_ids) == len(self.categories) == len(self.time_ms) == len(self.clicked) == n):
            raise ValueError(
                f"interactions columns differ in length: users {n}, items {len(self.item_ids)}, "
                f"categories {len(self.categories)}, times {len(self.time_ms)}, clicked {len(self.clicked)}"
            )

    def channel_counts(self) -> np.ndarray:
        """(n, 2) one-hot (impressions, clicks) per row."""
        clicked = np.asarray(self.clicked, dtype=bool)
        return np.stack([~clicked, clicked], axis=1).astype(np.int64)


@dataclass(frozen=True)
class ItemCountDelta:
    """Per-item counts one partition saw in one minute bucket: what it
    emits so that every reader can sum all partitions' item statistics."""

    minute_ms: int  # start of the minute bucket (effective time)
    item_ids: tuple[str, ...]  # sorted, unique
    impressions: np.ndarray  # (k,) int64
    clicks: np.ndarray  # (k,) int64


def item_count_deltas(interactions: Interactions | Iterable[ItemCountDelta]) -> list[ItemCountDelta]:
    """Per-minute, per-item counts of ``interactions`` (or the merge of
    several deltas), ordered by minute then item ID: equal inputs give equal
    deltas, whatever the order of rows.

    >>> rows = Interactions(["u1", "u2", "u2"], ["b", "a", "b"], ["c", "c", "c"],
    ...                     np.array([61_000, 62_000, 1_000]), np.array([False, True, False]))
    >>> [(d.minute_ms, d.item_ids, d.impressions.tolist(), d.clicks.tolist()) for d in item_count_deltas(rows)]
    [(0, ('b',), [1], [0]), (60000, ('a', 'b'), [0, 1], [1, 0])]
    """
    if isinstance(interactions, Interactions):
        minutes = np.asarray(interactions.time_ms, dtype=np.int64) // MINUTE_MS * MINUTE_MS
        items = np.asarray(list(interactions.item_ids), dtype=object)
        counts = interactions.channel_counts()
    else:
        deltas = list(interactions)
        minutes = np.concatenate([np.full(len(d.item_ids), d.minute_ms, dtype=np.int64) for d in deltas] or [np.zeros(0, np.int64)])
        items = np.asarray([i for d in deltas for i in d.item_ids], dtype=object)
        counts = np.concatenate([np.stack([d.impressions, d.clicks], axis=1) for d in deltas] or [np.zeros((0, 2), np.int64)])
    out = []
    for minute in np.unique(minutes).tolist():
        at = np.flatnonzero(minutes == minute)
        ids, inverse = np.unique(items[at].astype(str), return_inverse=True)
        summed = np.zeros((len(ids), 2), dtype=np.int64)
        np.add.at(summed, inverse, counts[at])
        out.append(ItemCountDelta(int(minute), tuple(ids.tolist()), summed[:, IMPRESSIONS], summed[:, CLICKS]))
    return out


class ItemStatistics:
    """Per-item impressions and clicks over the last hour and day, summed
    from the count deltas of every partition (any order)."""

    def __init__(self):
        self._counts = WindowedCounts(channels=2)

    def apply(self, deltas: Iterable[ItemCountDelta]) -> None:
        for delta in deltas:
            self._counts.add(
                fingerprint_strings(delta.item_ids),
                np.full(len(delta.item_ids), delta.minute_ms, dtype=np.int64),
                np.stack([delta.impressions, delta.clicks], axis=1),
            )

    def advance(self, floor_ms: int) -> None:
        self._counts.advance(floor_ms)

    def snapshot(self, as_of_ms: int) -> CountsSnapshot:
        """Keys: ``fingerprint_strings`` of item IDs; counts (k, 2, 2)."""
        return self._counts.snapshot(as_of_ms)

    def counts(self, item_ids: Sequence[str], as_of_ms: int) -> np.ndarray:
        """(n, 4) item columns of ``COUNT_COLUMNS`` as of ``as_of_ms``."""
        return self._counts.lookup(fingerprint_strings(item_ids), as_of_ms).reshape(len(item_ids), 4)


class UserStatistics:
    """Per (user, item category) impressions and clicks over the last hour
    and day, and each user's clicks in the last hour: exact in the partition
    that holds the user's events."""

    def __init__(self):
        self._by_category = WindowedCounts(channels=2)
        self._by_user = WindowedCounts(channels=1)  # clicks

    def add(self, interactions: Interactions) -> None:
        counts = interactions.channel_counts()
        time_ms = np.asarray(interactions.time_ms, dtype=np.int64)
        self._by_category.add(user_category_keys(interactions.user_ids, interactions.categories), time_ms, counts)
        clicked = np.flatnonzero(counts[:, CLICKS])
        users = [interactions.user_ids[i] for i in clicked.tolist()]
        self._by_user.add(fingerprint_strings(users), time_ms[clicked], np.ones((len(clicked), 1), dtype=np.int64))

    def advance(self, floor_ms: int) -> None:
        self._by_category.advance(floor_ms)
        self._by_user.advance(floor_ms)

    def snapshots(self, as_of_ms: int) -> tuple[CountsSnapshot, CountsSnapshot]:
        """(by (user, category): keys ``user_category_keys``, counts (k, 2, 2);
        by user: keys ``fingerprint_strings`` of user IDs, counts (k, 2, 1))."""
        return self._by_category.snapshot(as_of_ms), self._by_user.snapshot(as_of_ms)

    def counts(self, user_ids: Sequence[str], categories: Sequence[str], as_of_ms: int) -> np.ndarray:
        """(n, 5) user columns of ``COUNT_COLUMNS`` for (user, candidate category) rows."""
        n = len(user_ids)
        out = np.empty((n, 5), dtype=np.int64)
        out[:, :4] = self._by_category.lookup(user_category_keys(user_ids, categories), as_of_ms).reshape(n, 4)
        out[:, 4] = self._by_user.lookup(fingerprint_strings(user_ids), as_of_ms)[:, HOUR, 0]
        return out


# --- the encoding both training and serving feed the cross tower ---------------------------------


def encode_statistics(counts: np.ndarray, ctr_prior: float, prior_strength: float, out: np.ndarray | None = None) -> np.ndarray:
    """(n, 9) counts in ``COUNT_COLUMNS`` order -> (n, 13) float32 features
    in ``FEATURE_NAMES`` order: ``log1p`` of each count, then the smoothed
    CTRs ``(clicks + prior * strength) / (impressions + strength)``, clipped
    to [0, 1] (a click may count in a window its impression missed).
    ``out`` (n, 13) float32 is filled in place when given (serving reuses one).

    >>> features = encode_statistics(np.array([[10, 2, 0, 0, 0, 0, 0, 0, 1]]), ctr_prior=0.05, prior_strength=20.0)
    >>> [round(float(x), 4) for x in features[0, [0, 8, 9, 10]]]  # log1p 10, log1p 1, (2+1)/(10+20), 1/20
    [2.3979, 0.6931, 0.1, 0.05]
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != len(COUNT_COLUMNS):
        raise ValueError(f"statistics counts must be (n, {len(COUNT_COLUMNS)}), got {counts.shape}")
    if out is None:
        out = np.empty((counts.shape[0], len(FEATURE_NAMES)), dtype=np.float32)
    logs = out[:, : len(COUNT_COLUMNS)]
    np.copyto(logs, counts, casting="unsafe")
    np.log1p(logs, out=logs)
    pseudo_clicks = ctr_prior * prior_strength
    for j, (clicks, impressions) in enumerate(_CTR_COLUMNS):
        column = out[:, len(COUNT_COLUMNS) + j]
        np.add(counts[:, clicks], pseudo_clicks, out=column, casting="unsafe")
        np.divide(column, counts[:, impressions] + prior_strength, out=column, casting="unsafe")
        np.minimum(column, 1.0, out=column)
    return out
