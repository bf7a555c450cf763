"""The compacted ``user-embeddings`` Kafka topic, keyed by user ID.

Every released user ID row also goes here, for any consumer that wants
the latest embedding of a user without reading the release store (a
feature store, another service). The topic is compacted: the newest value
per key is what counts, so a row sent twice (at-least-once delivery after
a crash) is harmless. Full releases send all their rows too, because a
full model moves every embedding into a new space.

Message value (JSON, UTF-8)::

    {"user_id": "u42", "release": "00000007-embeddings", "model_version": "2026-11-21.1",
     "kind": "embeddings", "event_time_ms": 1795000000000, "dim": 64,
     "embedding": "<base64 of dim little-endian float32>"}

``event_time_ms`` is the newest click the row learnt from (null for rows
as the full model left them). ``decode_row`` reads it back.

A release of 1M rows goes out in a few seconds: ``encode_rows`` makes every
value with one base64 call over the whole table (the same bytes as
``encode_row``, row by row), and confluent-kafka's producer (librdkafka)
sends them, one record per user key so compaction keeps each user's newest
row, with the murmur2 partitioner of Kafka's Java client and kafka-python
(the same key lands on the same partition as with them).

The embedded broker (Tansu) accepts ``cleanup.policy=compact`` but never
compacts: the topic only grows there; on Apache Kafka it is compacted.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


LINGER_MS = 20
BATCH_BYTES = 1_000_000
QUEUE_KBYTES = 262_144  # rows waiting in the producer: 256 MiB, ~500k rows of 64 floats
QUEUE_MESSAGES = 1_000_000
ENCODE_CHUNK = 65_536  # rows encoded at a time


class TopicError(RuntimeError):
    """Sending rows to the user-embeddings topic failed."""


def encode_row(user_id: str, vector: np.ndarray, *, release: str, model_version: str, kind: str, event_time_ms: int | None) -> bytes:
    """One message value.

    >>> value = encode_row("u1", np.array([1.0, -0.5], np.float32), release="00000002-embeddings",
    ...                    model_version="2026-11-21.1", kind="embeddings", event_time_ms=5)
    >>> row = decode_row(value)
    >>> row["user_id"], row["embedding"].tolist(), row["event_time_ms"]
    ('u1', [1.0, -0.5], 5)
    """
    vector = np.ascontiguousarray(vector, dtype="<f4")
    return json.dumps(
        {
            "user_id": user_id,
            "release": release,
            "model_version": model_version,
            "kind": kind,
            "event_time_ms": event_time_ms,
            "dim": int(vector.shape[0]),
            "embedding": base64.b64encode(vector.tobytes()).decode("ascii"),
        },
        separators=(",", ":"),
    ).encode()


def _b64_rows(vectors: np.ndarray) -> list[bytes]:
    """Base64 of each row's little-endian float32 bytes, without a per-row
    call: whole 3-byte groups are encoded in one call over every row (a row's
    groups never straddle rows), the remaining 1 or 2 bytes per row in a second."""
    raw = np.ascontiguousarray(vectors, dtype="<f4").view(np.uint8).reshape(len(vectors), -1)
    width = raw.shape[1]
    whole, rest = width - width % 3, width % 3
    head = np.frombuffer(base64.b64encode(raw[:, :whole].tobytes()), np.uint8).reshape(len(raw), whole // 3 * 4)
    if rest:
        padded = np.zeros((len(raw), 3), np.uint8)
        padded[:, :rest] = raw[:, whole:]
        tail = np.frombuffer(base64.b64encode(padded.tobytes()), np.uint8).reshape(len(raw), 4).copy()
        tail[:, rest + 1 :] = ord("=")
        head = np.hstack([head, tail])
    row_bytes = head.shape[1]
    flat = head.tobytes()
    return [flat[i : i + row_bytes] for i in range(0, len(flat), row_bytes)]


_PLAIN_ID = re.compile(r'[^"\\\x00-\x1f\x7f-\U0010ffff]*')  # needs no JSON escaping (json.dumps escapes non-ASCII)


def encode_rows(
    user_ids: Sequence[str], vectors: np.ndarray, event_times_ms: np.ndarray | None, *, release: str, model_version: str, kind: str
) -> list[bytes]:
    """``encode_row`` of every row (``event_times_ms`` <= 0 or None: null), the same bytes, made in bulk.

    >>> vectors = np.array([[1.0, -0.5], [0.25, 2.0]], np.float32)
    >>> values = encode_rows(["u1", 'u"2'], vectors, np.array([5, 0]), release="r", model_version="m", kind="embeddings")
    >>> values[1] == encode_row('u"2', vectors[1], release="r", model_version="m", kind="embeddings", event_time_ms=None)
    True
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) != len(user_ids):
        raise ValueError(f"{len(user_ids)} user IDs need ({len(user_ids)}, dim) vectors, got shape {vectors.shape}")
    if event_times_ms is not None and len(event_times_ms) != len(user_ids):
        raise ValueError(f"{len(user_ids)} user IDs need as many event times, got {len(event_times_ms)}")
    middle = json.dumps({"release": release, "model_version": model_version, "kind": kind}, separators=(",", ":"))[1:-1]
    head = (middle + ',"event_time_ms":').encode()
    dim = f',"dim":{vectors.shape[1]},"embedding":"'.encode()
    if event_times_ms is None:
        times = [b"null"] * len(user_ids)
    else:
        times = [b"%d" % t if t > 0 else b"null" for t in np.asarray(event_times_ms, np.int64).tolist()]
    if _PLAIN_ID.fullmatch("".join(user_ids)):  # one check for all: the common case
        ids = [u.encode() for u in user_ids]
    else:
        ids = [(u if _PLAIN_ID.fullmatch(u) else json.dumps(u)[1:-1]).encode() for u in user_ids]
    template = b'{"user_id":"%b",' + head.replace(b"%", b"%%") + b"%b" + dim + b'%b"}'
    return [template % row for row in zip(ids, times, _b64_rows(vectors))]


def decode_row(value: bytes) -> dict:
    row = json.loads(value)
    row["embedding"] = np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
    if row["embedding"].shape[0] != row["dim"]:
        raise ValueError(f"user-embeddings message for {row.get('user_id')!r}: {row['embedding'].shape[0]} floats, dim says {row['dim']}")
    return row


class EmbeddingTopic:
    """A confluent-kafka (librdkafka) producer for the user-embeddings topic;
    kafka-python's admin client creates the topic."""

    def __init__(self, bootstrap_servers: str, topic: str, partitions: int = 4, replication: int = 1):
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.partitions = partitions
        self.replication = replication
        self._producer = None
        self._failures: list[str] = []  # of the send in progress (librdkafka's delivery reports)

    def ensure_topic(self) -> None:
        """Create the topic (compacted) unless it exists."""
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers, client_id="freshtower-publisher-admin", request_timeout_ms=10_000
        )
        try:
            if self.topic in admin.list_topics():
                return
            try:
                admin.create_topics([NewTopic(self.topic, self.partitions, self.replication, topic_configs={"cleanup.policy": "compact"})])
            except TopicAlreadyExistsError:
                pass
        finally:
            admin.close()

    def _producer_or_new(self):
        if self._producer is None:
            from confluent_kafka import Producer

            self.ensure_topic()
            self._producer = Producer(
                {
                    "bootstrap.servers": self.bootstrap_servers,
                    "client.id": "freshtower-publisher",
                    "acks": "all",
                    "partitioner": "murmur2_random",  # kafka-python's and Java's: a key lands where it did with them
                    "linger.ms": LINGER_MS,
                    "batch.size": BATCH_BYTES,  # large batches: small ones are slow on the embedded broker
                    "queue.buffering.max.kbytes": QUEUE_KBYTES,
                    "queue.buffering.max.messages": QUEUE_MESSAGES,
                    "message.send.max.retries": 5,
                    "delivery.report.only.error": True,  # a callback per failed row only
                    "on_delivery": self._delivered,
                }
            )
        return self._producer

    def send_rows(
        self,
        user_ids: Sequence[str],
        vectors: np.ndarray,
        event_times_ms: np.ndarray | None,
        *,
        release: str,
        model_version: str,
        kind: str,
        timeout_s: float = 120.0,
    ) -> int:
        """Send one message per row, keyed by user ID; wait until all are
        acknowledged. Raises ``TopicError`` if any failed or ``timeout_s`` passed."""
        producer = self._producer_or_new()
        self._failures.clear()
        deadline = time.monotonic() + timeout_s
        produce, topic = producer.produce, self.topic
        # Chunks: librdkafka's own threads send one chunk while the next is encoded.
        for start in range(0, len(user_ids), ENCODE_CHUNK):
            stop = min(start + ENCODE_CHUNK, len(user_ids))
            ids = user_ids[start:stop]
            times = None if event_times_ms is None else event_times_ms[start:stop]
            values = encode_rows(ids, vectors[start:stop], times, release=release, model_version=model_version, kind=kind)
            for user_id, value in zip(ids, values):
                while True:
                    try:
                        produce(topic, value, user_id.encode())
                        break
                    except BufferError:  # the local queue is full: let librdkafka send some first
                        if time.monotonic() > deadline:
                            raise TopicError(f"release {release}: the producer's queue to {topic} stayed full for {timeout_s} s") from None
                        producer.poll(0.05)
        left = producer.flush(max(0.0, deadline - time.monotonic()))
        failures = list(self._failures)
        if failures or left:
            raise TopicError(
                f"{len(failures) + left} of {len(user_ids)} rows of release {release} were not acknowledged by {topic}"
                + (f": {failures[0]}" if failures else f" within {timeout_s} s")
            )
        return len(user_ids)

    def _delivered(self, error, message) -> None:
        if error is not None:
            self._failures.append(f"{message.key()!r}: {error}")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None
