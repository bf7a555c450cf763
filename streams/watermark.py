"""Event time per input topic partition, robust to a minority of
out-of-order events. Pure: integers in, integers out.

A producer that replays a log, a mirror that lags or a client with a bad
clock puts a few events far from their neighbours in time. Taking a
partition's *largest* event time as its clock lets one such event close
every window at once (all the others become late, clicks orphaned). So a
topic partition's clock here is a high quantile of its recent events:

- **time** = the nearest-rank ``quantile`` (``streams.watermark_quantile``,
  0.9) of the last ``sample`` (``streams.watermark_sample``, 64) accepted
  event times: the smallest time that at least that share of them are at
  or below. Fewer than ``1 / (1 - quantile)`` events ahead of the bulk
  (6 of 64 at the defaults) cannot move it; with fewer than 10 events it
  is their maximum. It never moves back.
- **ahead of the stream**: with ``U`` the recent sample plus this
  micro-batch's events of the topic partition, ``bulk`` = U's ``quantile``
  and ``spread`` = bulk minus U's median, an event later than
  ``bulk + spread + max_future`` is ahead. In a stream in order the bulk's
  own top lies a quarter of a spread or so above it, so the bound scales
  with how dense the stream is (a quiet partition's events are minutes
  apart, a busy one's milliseconds), while an event hours ahead of the
  rest is refused. An event within ``max_future`` of the wall clock is
  never ahead (a live event after a quiet spell); one more than
  ``max_future`` after the wall clock always is. On replayed history the
  clock is far ahead of the events, and only the stream decides.
  An event past that bound is still in the stream if it is within
  ``max_future`` plus ``PACE_GAPS`` (20) mean gaps of the recent sample
  after the sample's latest event: replayed history or a backlog read
  after an outage puts hours of a quiet partition into one micro-batch,
  and the sparse tail of the batch (the night after a busy evening) lies
  beyond ``bulk + spread`` although each of its events follows the one
  before it. The sample grows event by event through the batch, so this
  allowance walks along the stream while a jump far beyond its pace does
  not. Refused events never enter the sample. With fewer than
  ``1 / (1 - quantile)`` events to go on (10 at the defaults; a restart
  empties the sample) only the wall-clock bound applies.

The join's watermark is the minimum of these clocks over a partition's
three topics (``streams/join.py``).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque

# Mean gaps of a partition's recent events that its next event may follow
# the latest of them by, beyond ``max_future`` (``SourceClock.pace_bound``).
PACE_GAPS = 20


class SourceClock:
    """The clock of one input topic partition.

    >>> clock = SourceClock(quantile=0.9, sample=20)
    >>> for ts in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 1_000]:
    ...     clock.add(ts)
    >>> clock.settle()
    18
    >>> clock.ahead_bound([20, 21, 5_000_000], now_ms=10**12, max_future_ms=100)  # bulk 21 + (21 - median 12) + 100
    130
    """

    __slots__ = ("quantile", "sample", "_recent", "_sorted", "_bulk", "time", "front")

    def __init__(self, quantile: float = 0.9, sample: int = 64):
        if not 0 < quantile <= 1:
            raise ValueError(f"watermark quantile must be in (0, 1], got {quantile}")
        if sample < 1:
            raise ValueError(f"watermark sample must be at least 1, got {sample}")
        self.quantile = quantile
        self.sample = sample
        self._recent: deque[int] = deque()
        self._sorted: list[int] = []
        self._bulk: int | None = None
        self.time: int | None = None  # robust event time; None before the first event
        self.front: int | None = None  # largest accepted event time

    @property
    def bulk_ms(self) -> int | None:
        """The quantile of the recent sample (what the last bound was built on)."""
        return self._bulk

    def ahead_bound(self, batch: list[int], now_ms: int, max_future_ms: int) -> int:
        """The latest event time accepted from ``batch`` (this micro-batch's
        event times of the partition): later ones are ahead of the stream."""
        live_bound = now_ms + max_future_ms
        values = sorted(self._sorted + batch) if self._sorted else sorted(batch)
        n = len(values)
        if n * (1 - self.quantile) < 1:
            self._bulk = None
            return live_bound  # too few events to tell a minority from the bulk
        bulk = values[_rank(self.quantile, n) - 1]
        spread = bulk - values[_rank(min(0.5, self.quantile), n) - 1]
        self._bulk = bulk
        stream_bound = bulk + spread + max_future_ms
        if stream_bound >= now_ms - max_future_ms:  # reaches the live zone around the clock
            return live_bound
        return stream_bound

    def pace_bound(self, now_ms: int, max_future_ms: int) -> int:
        """The latest event time that still follows the recent sample at
        its own pace: its latest event plus ``max_future_ms`` plus
        ``PACE_GAPS`` mean gaps between its events; never past the
        wall-clock bound; with an empty sample, no allowance (0). Ask it
        of an event past ``ahead_bound``.

        >>> clock = SourceClock(quantile=0.9, sample=4)
        >>> for ts in [0, 600, 1200, 1800]:
        ...     clock.add(ts)
        >>> clock.pace_bound(now_ms=10**9, max_future_ms=100)  # 1800 + 100 + 20 * 600
        13900
        """
        values = self._sorted
        if not values:
            return 0  # no pace to follow yet (a new partition, a restart): no allowance
        mean_gap = (values[-1] - values[0]) // (len(values) - 1) if len(values) > 1 else 0
        return min(now_ms + max_future_ms, values[-1] + max_future_ms + PACE_GAPS * mean_gap)

    def add(self, ts: int) -> None:
        """An accepted event's time."""
        self._recent.append(ts)
        insort(self._sorted, ts)
        if len(self._recent) > self.sample:
            old = self._recent.popleft()
            del self._sorted[bisect_left(self._sorted, old)]
        if self.front is None or ts > self.front:
            self.front = ts

    def settle(self) -> int | None:
        """Move ``time`` to the quantile of the recent sample (never back)."""
        values = self._sorted
        if values:
            candidate = values[_rank(self.quantile, len(values)) - 1]
            if self.time is None or candidate > self.time:
                self.time = candidate
        return self.time


def _rank(quantile: float, n: int) -> int:
    """Nearest rank (1-based) of ``quantile`` among ``n`` values: ceil(q * n)."""
    return min(n, max(1, math.ceil(quantile * n - 1e-9)))
