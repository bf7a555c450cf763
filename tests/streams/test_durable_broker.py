"""The durable broker: Tansu on moto's S3 server keeps records and committed
group offsets across a SIGKILL and a start on the same port; the memory
default loses them (what the operations doc says a restart costs there)."""

from __future__ import annotations

import signal

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from freshtower.streams.broker import LocalBroker
from freshtower.streams.durable_broker import ObjectStoreServer, durable_broker

pytestmark = pytest.mark.slow


def _produce(bootstrap: str, topic: str, values: range) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024, acks="all")
    for value in values:
        producer.send(topic, key=b"k", value=str(value).encode(), partition=0)
    producer.flush(30)
    producer.close()


def _consume(bootstrap: str, topic: str, group: str | None, expected: int, commit: bool = False) -> list[int]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        consumer_timeout_ms=8000,
    )
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    values = []
    for message in consumer:
        values.append(int(message.value))
        if len(values) >= expected:
            break
    if commit:
        consumer.commit()
    consumer.close()
    return values


def _kill(broker: LocalBroker) -> None:
    broker.process.send_signal(signal.SIGKILL)
    broker.process.wait(10)
    broker.process = None


def test_records_and_committed_offsets_survive_a_broker_sigkill(tmp_path, kafka_broker):
    store = ObjectStoreServer(log_path=tmp_path / "s3.log").start()
    try:
        broker = durable_broker(store, binary=kafka_broker.binary, log_path=tmp_path / "broker.log").start()
        try:
            _produce(broker.bootstrap, "durable", range(1000))
            assert _consume(broker.bootstrap, "durable", "readers", 600, commit=True) == list(range(600))
            _kill(broker)
            broker.start()  # the same port, as a process manager restarts it
            _produce(broker.bootstrap, "durable", range(1000, 1010))
            assert _consume(broker.bootstrap, "durable", None, 1010) == list(range(1010))
            # the group goes on after its committed offset: nothing read twice, nothing skipped
            assert _consume(broker.bootstrap, "durable", "readers", 410) == list(range(600, 1010))
        finally:
            broker.stop()
    finally:
        store.stop()


def test_the_memory_default_loses_its_topics_on_a_restart(tmp_path, kafka_broker):
    broker = LocalBroker(binary=kafka_broker.binary, log_path=tmp_path / "broker.log").start()
    try:
        _produce(broker.bootstrap, "volatile", range(100))
        _kill(broker)
        broker.start()
        assert _consume(broker.bootstrap, "volatile", None, 100) == []
    finally:
        broker.stop()
