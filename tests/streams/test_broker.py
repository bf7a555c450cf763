from __future__ import annotations

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def test_the_local_broker_round_trips_messages_on_loopback(kafka_broker):
    assert kafka_broker.bootstrap.startswith("127.0.0.1:")
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    for n in range(20):
        producer.send("broker-smoke", key=b"k", value=f"m{n}".encode())
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, consumer_timeout_ms=5000)
    partition = TopicPartition("broker-smoke", 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    values = [m.value.decode() for m in consumer]
    consumer.close()
    assert values == [f"m{n}" for n in range(20)]
