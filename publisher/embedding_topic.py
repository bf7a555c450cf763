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

The embedded broker (Tansu) accepts ``cleanup.policy=compact`` but never
compacts: the topic only grows there; on Apache Kafka it is compacted.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


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


def decode_row(value: bytes) -> dict:
    row = json.loads(value)
    row["embedding"] = np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
    if row["embedding"].shape[0] != row["dim"]:
        raise ValueError(f"user-embeddings message for {row.get('user_id')!r}: {row['embedding'].shape[0]} floats, dim says {row['dim']}")
    return row


class EmbeddingTopic:
    """A kafka-python producer for the user-embeddings topic."""

    def __init__(self, bootstrap_servers: str, topic: str, partitions: int = 4, replication: int = 1):
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.partitions = partitions
        self.replication = replication
        self._producer = None

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
            from kafka import KafkaProducer

            self.ensure_topic()
            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap_servers,
                client_id="freshtower-publisher",
                acks="all",
                linger_ms=20,  # 256 KB batches: small batches are slow on the embedded broker
                batch_size=256 * 1024,
                retries=5,
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
        acknowledged. Raises ``TopicError`` if any failed."""
        producer = self._producer_or_new()
        failures: list[BaseException] = []
        for i, user_id in enumerate(user_ids):
            event_time = None if event_times_ms is None or event_times_ms[i] <= 0 else int(event_times_ms[i])
            value = encode_row(user_id, vectors[i], release=release, model_version=model_version, kind=kind, event_time_ms=event_time)
            producer.send(self.topic, key=user_id.encode(), value=value).add_errback(failures.append)
        producer.flush(timeout=timeout_s)
        if failures:
            raise TopicError(
                f"{len(failures)} of {len(user_ids)} rows of release {release} were not acknowledged by {self.topic}: {failures[0]!r}"
            )
        return len(user_ids)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None
