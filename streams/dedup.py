"""Event IDs already joined and written out, remembered for a horizon of
event time, so that a copy arriving after its request left the join state
(a producer retrying late, a mirror replaying a day) counts once. Pure.

While a request is open its state holds its event IDs (``streams/join.py``
deduplicates against them). When a request is finalized, its IDs move here:
into the bucket of its impression's hour of event time, as 64-bit
fingerprints (``freshtower.core.fingerprints``) in a Python set per bucket.
The horizon counts from the moment a request is written out (``grace``
after its impression: the join window, a window and the allowed lateness),
so with the default of a day a whole day delivered again counts once. A
bucket is dropped once the watermark is ``grace + horizon`` past its end,
so the memory is bounded by the events of one horizon; an event older
than the watermark minus ``grace + horizon`` cannot be checked any more
and the join dead-letters it as ``too_late``.

Exact per-bucket sets rather than a Bloom filter: no false positives (a
Bloom filter would drop a small share of new events as duplicates), at
about 60-70 bytes per ID (measured in ``tests/streams/test_dedup.py``:
a day of 1M event IDs is ~65 MB; see docs/streams.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from freshtower.core.fingerprints import fingerprint_strings

BUCKET_MS = 3_600_000  # one hour of event time per bucket


class JoinedIds:
    """Fingerprints of written-out event IDs, bucketed by event hour.

    >>> ids = JoinedIds(horizon_ms=86_400_000, grace_ms=0)
    >>> ids.add(["imp-1", "clk-1"], ts_ms=5_000)
    >>> ids.seen("clk-1"), ids.seen("clk-2")
    (True, False)
    >>> ids.expire(watermark_ms=86_400_000 + 3_600_000)  # the bucket [0, 1 h) falls out of the horizon
    1
    >>> ids.seen("clk-1")
    False
    """

    def __init__(self, horizon_ms: int, grace_ms: int = 0):
        self.horizon_ms = horizon_ms
        self.grace_ms = grace_ms
        self._buckets: dict[int, set[int]] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, event_ids: Iterable[str], ts_ms: int) -> None:
        event_ids = list(event_ids)
        if not event_ids or self.horizon_ms <= 0:
            return
        bucket = self._buckets.setdefault(ts_ms - ts_ms % BUCKET_MS, set())
        bucket.update(fingerprint_strings(event_ids).tolist())

    def seen(self, event_id: str) -> bool:
        if not self._buckets:
            return False
        fingerprint = fingerprint_strings([event_id]).tolist()[0]
        return any(fingerprint in bucket for bucket in self._buckets.values())

    def seen_many(self, event_ids: list[str]) -> list[bool]:
        """``seen`` for a batch (one vectorised hash)."""
        if not self._buckets or not event_ids:
            return [False] * len(event_ids)
        buckets = list(self._buckets.values())
        return [any(f in b for b in buckets) for f in fingerprint_strings(event_ids).tolist()]

    def too_late(self, ts_ms: int, watermark_ms: int | None) -> bool:
        """Older than the horizon: a copy could no longer be recognised."""
        return self.horizon_ms > 0 and watermark_ms is not None and ts_ms < watermark_ms - self.grace_ms - self.horizon_ms

    def expire(self, watermark_ms: int) -> int:
        """Drop buckets wholly older than the horizon; return how many."""
        cut = watermark_ms - self.grace_ms - self.horizon_ms
        old = [start for start in self._buckets if start + BUCKET_MS <= cut]
        for start in old:
            del self._buckets[start]
        return len(old)
