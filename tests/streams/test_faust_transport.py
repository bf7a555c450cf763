from __future__ import annotations

import uuid

from freshtower.streams.faust_transport import true_end_offsets
from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def test_end_offsets_come_from_fetch_responses_not_the_brokers_list_offsets(kafka_broker):
    topic = f"end-offsets-{uuid.uuid4().hex[:6]}"
    # A long linger keeps each ten in one record batch until flush(); without
    # it a busy machine's sender thread may ship a batch half full.
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, linger_ms=10_000)
    for _ in range(3):  # three record batches of ten
        for n in range(10):
            producer.send(topic, value=b"x", partition=0)
        producer.flush()
    producer.close()
    empty = f"{topic}-empty"
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    producer.send(empty, value=b"x", partition=0).get(10)  # creates it; then we ask about partition 0 only
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap)
    tp, other = TopicPartition(topic, 0), TopicPartition(empty, 0)
    reported = consumer.end_offsets([tp, other])
    consumer.close()
    # Tansu answers ListOffsets(latest) with the last batch's start + 1 (21
    # here); a real Kafka with 30. Either way the fetch response says 30.
    assert reported[tp] in (21, 30)
    assert true_end_offsets(kafka_broker.bootstrap, reported) == {tp: 30, other: 1}


def test_the_input_fetch_waits_as_long_as_the_settings_say():
    """Faust hands aiokafka a fixed 1,500 ms fetch wait, which the embedded
    broker spends before answering; the worker's consumer takes
    ``streams.fetch_max_wait_ms`` instead."""
    import asyncio

    from freshtower.streams.app import create_app

    from freshtower.core.settings import load_settings

    async def fetch_wait(settings) -> int:
        app, _ = create_app(settings)
        thread = app.consumer._thread
        consumer = thread._create_worker_consumer(app.transport)
        return consumer._fetch_max_wait_ms

    assert asyncio.run(fetch_wait(load_settings(kafka="127.0.0.1:1", streams={"fetch_max_wait_ms": 100}))) == 100
    assert asyncio.run(fetch_wait(load_settings(kafka="127.0.0.1:1"))) == 1500
