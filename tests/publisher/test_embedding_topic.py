from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
from freshtower.publisher.embedding_topic import EmbeddingTopic, decode_row
from freshtower.publisher.publish import Publisher
from freshtower.trainer.online import OnlineTrainer

from tests.publisher.conftest import publisher_settings


def read_topic(bootstrap: str, topic: str, partitions: int, expected: int, timeout: float = 60.0) -> list:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, client_id="test-reader")
    assigned = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(assigned)
    consumer.seek_to_beginning(*assigned)
    messages = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(500).values():
                messages.extend(batch)
    finally:
        consumer.close()
    return messages


@pytest.mark.slow
def test_released_rows_reach_the_compacted_topic_keyed_by_user_id(data_dir, kafka_broker):
    topic_name = f"user-embeddings-{uuid.uuid4().hex[:8]}"
    settings = publisher_settings(
        data_dir, kafka=kafka_broker.bootstrap, topics={"user_embeddings": topic_name}, publisher={"kafka_enabled": True}
    )
    OnlineTrainer.start(settings).run(max_batches=3, prefetch=False)
    topic = EmbeddingTopic(settings.bootstrap_servers, topic_name, partitions=2)
    with Publisher(settings, topic=topic) as publisher:
        full, delta = publisher.tick(now_s=0.0)
        store = publisher.store
        assert store.read_note("kafka.json") == {"sent_through": delta.version, "sent_through_sequence": 2}

    def rows(version):
        release = store.get(version)
        ids = json.loads(release.file("user_ids.json").read_text())
        return {u: v for u, v in zip(ids, np.load(release.file("user_embeddings.npy"))) if u}

    full_rows, delta_rows = rows(full.version), rows(delta.version)
    messages = read_topic(settings.bootstrap_servers, topic_name, 2, len(full_rows) + len(delta_rows))
    assert len(messages) == len(full_rows) + len(delta_rows)
    latest = {}
    for message in sorted(messages, key=lambda m: (m.partition, m.offset)):  # a key always lands on one partition
        row = decode_row(message.value)
        assert message.key.decode() == row["user_id"]
        latest[row["user_id"]] = row
    assert set(latest) == set(full_rows) | set(delta_rows)  # users admitted online are only in the delta
    assert set(delta_rows) - set(full_rows)
    for user_id, row in latest.items():
        expected = delta_rows[user_id] if user_id in delta_rows else full_rows[user_id]
        np.testing.assert_array_equal(row["embedding"], expected)
        assert row["release"] == (delta.version if user_id in delta_rows else full.version)
        assert (row["event_time_ms"] is not None) == (user_id in delta_rows)


class FlakyTopic(EmbeddingTopic):
    """Refuses while ``down``; records what it was sent."""

    def __init__(self):
        super().__init__("127.0.0.1:1", "user-embeddings")
        self.down = True
        self.sent: list[tuple[str, int]] = []

    def send_rows(self, user_ids, vectors, event_times_ms, *, release, model_version, kind, timeout_s=120.0):
        if self.down:
            raise OSError("connection refused")
        self.sent.append((release, len(user_ids)))
        return len(user_ids)


def test_a_broker_outage_does_not_stop_releases_and_the_rows_are_sent_later(data_dir):
    settings = publisher_settings(data_dir)
    OnlineTrainer.start(settings).run(max_batches=2, prefetch=False)
    topic = FlakyTopic()
    with Publisher(settings, topic=topic) as publisher:
        full, delta = publisher.tick(now_s=0.0)
        assert (full.status, delta.status) == ("published", "published")
        assert publisher.store.read_note("kafka.json") is None and topic.sent == []
        topic.down = False
        publisher.tick(now_s=1.0)  # nothing new to release; the topic catches up
        users = publisher.store.get(full.version).manifest.rows["user_embeddings"] - 1  # all but the default row
        assert topic.sent == [(full.version, users), (delta.version, delta.rows)]
        publisher.tick(now_s=2.0)
        assert len(topic.sent) == 2  # sent once


@pytest.mark.parametrize("dim", [64, 1, 2, 3, 5])
def test_rows_encoded_in_bulk_are_the_bytes_of_one_row_at_a_time(dim):
    from freshtower.publisher.embedding_topic import encode_row, encode_rows

    rng = np.random.default_rng(dim)
    vectors = rng.normal(size=(40, dim)).astype(np.float32)
    user_ids = [f"u{i}" for i in range(36)] + ['quote"and\\slash', "é\nnew line", "per%cent", ""]
    event_times = rng.integers(-3, 1_800_000_000_000, size=40)
    event_times[:5] = 0
    for times in (event_times, None):
        values = encode_rows(user_ids, vectors, times, release="00000003-embeddings", model_version='m"1%s', kind="embeddings")
        one_at_a_time = [
            encode_row(
                u, vectors[i], release="00000003-embeddings", model_version='m"1%s', kind="embeddings",
                event_time_ms=None if times is None or times[i] <= 0 else int(times[i]),
            )
            for i, u in enumerate(user_ids)
        ]
        assert values == one_at_a_time
        assert [decode_row(v)["user_id"] for v in values] == user_ids
