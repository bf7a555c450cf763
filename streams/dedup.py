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

A restart or a rebalance does not forget them: what a partition's
requests add is also kept as chunk records (``chunk_records``: one per
partition and bucket each time requests are written out, 8 bytes an ID),
which the streams worker writes to the changelog of its table
``join-written-ids`` in that partition before the requests' own
tombstones, and reads back with ``restore`` when it takes the partition
over. A bucket that expires yields its chunks' keys (``take_expired``) for
tombstones, so the changelog is bounded by the horizon as the memory is.

Exact per-bucket sets rather than a Bloom filter: no false positives (a
Bloom filter would drop a small share of new events as duplicates), at
about 60-70 bytes per ID (measured in ``tests/streams/test_dedup.py``:
a day of 1M event IDs is ~65 MB; see docs/streams.md).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable

import numpy as np

from freshtower.core.fingerprints import fingerprint_strings

BUCKET_MS = 3_600_000  # one hour of event time per bucket
CHUNK_IDS = 16_384  # fingerprints per chunk record at most: ~175 KB of base64, well inside a producer batch


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

    What was added survives in chunk records (a worker's changelog):

    >>> ids.add(["imp-2"], ts_ms=90_000_000, partition=3)
    >>> records = ids.chunk_records()
    >>> [(key.split("/")[:2], len(value["fingerprints"])) for key, value in records]
    [(['3', '90000000'], 12)]
    >>> restored = JoinedIds(horizon_ms=86_400_000)
    >>> restored.restore(*records[0])
    >>> restored.seen("imp-2")
    True
    """

    def __init__(self, horizon_ms: int, grace_ms: int = 0):
        self.horizon_ms = horizon_ms
        self.grace_ms = grace_ms
        self._buckets: dict[int, set[int]] = {}
        # Chunks of fingerprints added but not yet taken for the changelog:
        # (partition, bucket start) -> arrays.
        self._unsaved: dict[tuple[int, int], list[np.ndarray]] = {}
        # Bucket start -> (partition, key) of each chunk record behind it.
        self._chunk_keys: dict[int, list[tuple[int, str]]] = {}
        self._expired: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, event_ids: Iterable[str], ts_ms: int, partition: int = 0) -> None:
        """Remember the IDs of a request written out; ``ts_ms``: its
        impression's time; ``partition``: whose chunk records keep them."""
        event_ids = list(event_ids)
        if not event_ids or self.horizon_ms <= 0:
            return
        start = ts_ms - ts_ms % BUCKET_MS
        fingerprints = fingerprint_strings(event_ids)
        self._buckets.setdefault(start, set()).update(fingerprints.tolist())
        self._unsaved.setdefault((partition, start), []).append(fingerprints)

    def chunk_records(self) -> list[tuple[str, dict]]:
        """The IDs added since the last call, as (key, value) records, one
        per partition and bucket; JSON-serialisable, the partition inside."""
        records = []
        for (partition, start), chunks in sorted(self._unsaved.items()):
            fingerprints = np.concatenate(chunks).astype("<u8")
            for at in range(0, len(fingerprints), CHUNK_IDS):
                key = f"{partition}/{start}/{uuid.uuid4().hex[:12]}"
                piece = fingerprints[at : at + CHUNK_IDS].tobytes()
                value = {"partition": partition, "bucket_ms": start, "fingerprints": base64.b64encode(piece).decode("ascii")}
                self._chunk_keys.setdefault(start, []).append((partition, key))
                records.append((key, value))
        self._unsaved.clear()
        return records

    def restore(self, key: str, value: dict) -> None:
        """Take back a chunk record (a worker taking a partition over)."""
        start = int(value["bucket_ms"])
        fingerprints = np.frombuffer(base64.b64decode(value["fingerprints"]), dtype="<u8")
        self._buckets.setdefault(start, set()).update(fingerprints.tolist())
        self._chunk_keys.setdefault(start, []).append((int(value["partition"]), key))

    def take_expired(self) -> list[tuple[int, str]]:
        """(partition, key) of the chunk records whose bucket expired since
        the last call: their tombstones."""
        expired, self._expired = self._expired, []
        return expired

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
            for partition, key in self._chunk_keys.pop(start, []):
                self._expired.append((partition, key))
            for unsaved in [k for k in self._unsaved if k[1] == start]:
                del self._unsaved[unsaved]
        return len(old)
