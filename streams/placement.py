"""Which partition an event belongs on: producers key every event by
``user_id`` and must partition with murmur2, the Java client's and
kafka-python's default, so that one user's impressions, clicks and rank
logs share a partition number on the three topics. librdkafka-based
clients (confluent-kafka, kcat, most Go, C and .NET clients) default to
CRC32 (``consistent_random``) and place the same key elsewhere; they must
set ``partitioner=murmur2_random``. Pure.
"""

from __future__ import annotations

from kafka.partitioner.default import murmur2

_CACHE_LIMIT = 200_000


class Placement:
    """murmur2(key) mod ``partitions``, cached per key (users repeat).

    >>> Placement(4).partition(b"u1")
    0
    """

    def __init__(self, partitions: int):
        self.partitions = partitions
        self._cache: dict[bytes, int] = {}

    def partition(self, key: bytes) -> int:
        cache = self._cache
        partition = cache.get(key)
        if partition is None:
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            # kafka-python's DefaultPartitioner: positive murmur2 hash mod the partition count
            partition = cache[key] = (murmur2(key) & 0x7FFFFFFF) % self.partitions
        return partition

    def reason(self, key: bytes, partition: int) -> str:
        return (
            f"key {key[:60]!r} arrived on partition {partition}, but murmur2 places it on partition {self.partition(key)}: "
            f"producers must partition by murmur2 of user_id (the Java and kafka-python default); librdkafka clients "
            f"(confluent-kafka, kcat, Go/C/.NET) must set partitioner=murmur2_random"
        )
