"""Announcements between the parts: small JSON records on a Kafka topic
that wake the next stage at once instead of at its next poll.

- The streams worker announces each batch on ``topics.training_batches``
  (after the file is durable); the online trainer wakes on it.
- The online trainer announces each checkpoint on
  ``topics.online_checkpoints``; the publisher wakes on it.
- The publisher announces each activated release on ``topics.releases``;
  the recall service wakes on it.

An announcement is a hint, never the truth: the woken stage reads the
state it always reads (batch manifests, the checkpoint, the release
pointer), so a duplicate or a stale announcement costs one extra look and
a missing one (no broker, a restart) only the fallback poll interval. A
broker that is not there is logged once and retried; it never stops a part.

``Wakeup`` reads without a consumer group (``assign``: no join delay on the
embedded broker) from the end of the topic, or from its start when the
topic appears only after the reader started.
"""

from __future__ import annotations

import json
import logging
import threading
import time

log = logging.getLogger(__name__)


class Announcer:
    """Sends announcements to ``topic``; never raises (a failure is logged)."""

    def __init__(self, bootstrap: str, topic: str, *, enabled: bool = True, retry_seconds: float = 5.0):
        self.bootstrap, self.topic, self.enabled, self.retry_seconds = bootstrap, topic, enabled, retry_seconds
        self._producer = None
        self._failed_at: float | None = None
        self.sent = 0

    def _producer_or_none(self):
        if self._producer is not None or not self.enabled:
            return self._producer
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_seconds:
            return None
        try:
            from kafka import KafkaAdminClient, KafkaProducer
            from kafka.admin import NewTopic
            from kafka.errors import TopicAlreadyExistsError

            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="freshtower-announcer", request_timeout_ms=5000)
            try:
                if self.topic not in admin.list_topics():
                    try:
                        admin.create_topics([NewTopic(self.topic, 1, 1)])
                    except TopicAlreadyExistsError:
                        pass
            finally:
                admin.close()
            self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, client_id="freshtower-announcer", linger_ms=0, acks=1)
        except Exception as error:  # no broker: the fallback poll carries the hand-off
            if self._failed_at is None:
                log.warning("announcements on %s are off for now (%s); the next stage falls back to polling", self.topic, error)
            self._failed_at = time.monotonic()
        return self._producer

    def announce(self, record: dict) -> bool:
        """Send ``record`` as JSON (plus ``announced_at``, wall seconds); True if handed to the broker."""
        producer = self._producer_or_none()
        if producer is None:
            return False
        try:
            producer.send(self.topic, json.dumps({**record, "announced_at": time.time()}).encode())
            producer.flush(5)
        except Exception as error:
            log.warning("announcement on %s failed: %s", self.topic, error)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(5)
            self._producer = None


class Wakeup:
    """Follows ``topic`` in a daemon thread; ``wait(timeout)`` returns True as
    soon as an announcement arrived since the last ``wait``, else False after
    ``timeout`` seconds (the fallback poll). Disabled: a plain sleep."""

    def __init__(self, bootstrap: str, topic: str, *, enabled: bool = True, fetch_wait_ms: int = 50, retry_seconds: float = 2.0):
        self.bootstrap, self.topic, self.enabled = bootstrap, topic, enabled
        self.fetch_wait_ms, self.retry_seconds = fetch_wait_ms, retry_seconds
        self.received = 0
        self.last: dict | None = None
        self._event = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Wakeup:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._follow, name=f"wakeup-{self.topic}", daemon=True)
            self._thread.start()
        return self

    def wait(self, timeout: float) -> bool:
        if not self.enabled:
            time.sleep(timeout)
            return False
        woken = self._event.wait(timeout)
        self._event.clear()  # before the caller looks: a later announcement wakes the next wait
        return woken

    def close(self) -> None:
        self._closed.set()
        self._event.set()

    def _follow(self) -> None:
        said = False
        from_start = False
        while not self._closed.is_set():
            consumer = None
            try:
                from kafka import KafkaConsumer, TopicPartition

                consumer = KafkaConsumer(
                    bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                    fetch_max_wait_ms=self.fetch_wait_ms, client_id="freshtower-wakeup",
                )
                partitions = consumer.partitions_for_topic(self.topic)
                if not partitions:
                    from_start = True  # it appears later: its first records are new
                    raise LookupError(f"topic {self.topic} does not exist yet")
                assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
                consumer.assign(assigned)
                (consumer.seek_to_beginning if from_start else consumer.seek_to_end)(*assigned)
                log.info("following announcements on %s", self.topic)
                while not self._closed.is_set():
                    for records in consumer.poll(timeout_ms=200).values():
                        for record in records:
                            self.received += 1
                            try:
                                self.last = json.loads(record.value)
                            except (TypeError, ValueError):
                                self.last = None
                        if records:
                            self._event.set()
            except Exception as error:
                if not said and not isinstance(error, LookupError):
                    log.warning("not following %s (%s); polling only until it answers", self.topic, error)
                    said = True
                self._closed.wait(self.retry_seconds)
            finally:
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:
                        pass


__all__ = ["Announcer", "Wakeup"]
