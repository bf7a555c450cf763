"""1M changed user rows to the compacted user-embeddings topic, beside the
raw producer's rate in the same run.

    python benchmarks/bench_embedding_topic.py                 # 1M rows x 64 on a local Tansu broker
    python benchmarks/bench_embedding_topic.py --before 200000 # also the kafka-python paths, on 200k rows each
    python benchmarks/bench_embedding_topic.py --rows 200000   # quicker

Rows: ``u0 .. u<N-1>``, seeded unit vectors, event times. Each path writes
its own new topic (4 partitions, compacted) on one embedded broker:

- ``EmbeddingTopic.send_rows``: what the publisher runs (bulk encoding,
  confluent-kafka producer), timed from the arrays to the last acknowledgement;
- the raw confluent-kafka producer with the same settings, sending values
  encoded beforehand (untimed): the client's own ceiling, the limit;
- with ``--before N``: the previous path (kafka-python producer, one
  ``encode_row`` per row, linger 20 ms, 256 KB batches, acks=all) and the
  raw kafka-python producer sending values encoded beforehand.

The stage must take at most 10 s for 1M rows; its ratio to the raw
producer is printed beside.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from freshtower.publisher import embedding_topic
from freshtower.publisher.embedding_topic import EmbeddingTopic, encode_row, encode_rows
from freshtower.streams.broker import LocalBroker, resolve_binary

STAGE_LIMIT_S = 10.0  # for 1M rows
RELEASE = dict(release="00000002-embeddings", model_version="bench.1", kind="embeddings")


def raw_confluent(bootstrap: str, topic: str, user_ids, values) -> float:
    from confluent_kafka import Producer

    EmbeddingTopic(bootstrap, topic, 4).ensure_topic()
    producer = Producer(
        {
            "bootstrap.servers": bootstrap, "acks": "all", "partitioner": "murmur2_random", "linger.ms": embedding_topic.LINGER_MS,
            "batch.size": embedding_topic.BATCH_BYTES, "queue.buffering.max.kbytes": embedding_topic.QUEUE_KBYTES,
            "queue.buffering.max.messages": embedding_topic.QUEUE_MESSAGES, "delivery.report.only.error": True,
        }
    )
    started = time.perf_counter()
    for user_id, value in zip(user_ids, values):
        while True:
            try:
                producer.produce(topic, value, user_id.encode())
                break
            except BufferError:
                producer.poll(0.05)
    left = producer.flush(600)
    seconds = time.perf_counter() - started
    assert left == 0, f"{left} messages not delivered"
    return seconds


def kafka_python(bootstrap: str, topic: str, user_ids, vectors, times, values=None) -> float:
    """The previous path (``values`` None: one encode_row per row, timed), or the raw client on ``values``."""
    from kafka import KafkaProducer

    EmbeddingTopic(bootstrap, topic, 4).ensure_topic()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=256 * 1024, retries=5)
    started = time.perf_counter()
    for i, user_id in enumerate(user_ids):
        value = values[i] if values is not None else encode_row(user_id, vectors[i], event_time_ms=int(times[i]), **RELEASE)
        producer.send(topic, key=user_id.encode(), value=value)
    producer.flush(timeout=600)
    seconds = time.perf_counter() - started
    producer.close(timeout=10)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--before", type=int, default=0, help="rows for the kafka-python paths (0: skip them)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    vectors = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    times = 1_795_090_000_000 - rng.integers(0, 3_600_000, args.rows)
    user_ids = [f"u{i}" for i in range(args.rows)]
    values = encode_rows(user_ids, vectors, times, **RELEASE)
    print(f"{args.rows:,} rows x {args.dim} float32, {len(values[0])} bytes per value; local Tansu broker (memory), 4 partitions")
    with tempfile.TemporaryDirectory(prefix="bench-topic-") as home:
        with LocalBroker(binary=resolve_binary(Path(home)), log_path=Path(home) / "broker.log") as broker:
            rows = []
            topic = EmbeddingTopic(broker.bootstrap, "user-embeddings-stage", 4)
            started = time.perf_counter()
            topic.send_rows(user_ids, vectors, times, timeout_s=600, **RELEASE)
            stage = time.perf_counter() - started
            topic.close()
            raw = raw_confluent(broker.bootstrap, "user-embeddings-raw", user_ids, values)
            rows.append(("EmbeddingTopic.send_rows (confluent-kafka)", args.rows, stage, raw))
            if args.before:
                n = min(args.before, args.rows)
                old = kafka_python(broker.bootstrap, "user-embeddings-before", user_ids[:n], vectors, times)
                old_raw = kafka_python(broker.bootstrap, "user-embeddings-before-raw", user_ids[:n], vectors, times, values)
                rows.append(("previous: kafka-python, encode_row per row", n, old, old_raw))
    print(f"\n{'path':>44} {'rows':>9} {'s':>6} {'rows/s':>9} {'raw client rows/s':>17} {'ratio':>6} {'1M rows s':>9}")
    for name, n, seconds, raw_seconds in rows:
        print(
            f"{name:>44} {n:>9,} {seconds:>6.1f} {n / seconds:>9,.0f} {n / raw_seconds:>17,.0f} "
            f"{raw_seconds / seconds:>6.2f} {seconds * 1_000_000 / n:>9.1f}"
        )
    print(f"\nraw client: the same producer sending values encoded beforehand; limit {STAGE_LIMIT_S:.0f} s for 1M rows")


if __name__ == "__main__":
    main()
