"""A recall replica follows the user-embeddings topic between releases.

With ``service.follow_topic``, every replica reads the compacted
``topics.user_embeddings`` topic (the publisher sends every released row
there, ``embedding_topic``) from its beginning, on all partitions, without
a consumer group (each replica needs every row), and applies the rows of
releases **newer than the one it serves** on top of it, as NVIDIA's HPS
lets inference nodes follow a model's online updates. The publisher sends
a release's rows right after activating it, so N replicas serve a new row
within a fraction of a second of each other, long before each has read
the pointer and loaded the release from the store; the store stays the
source of truth (a replica that misses a row loads it with the release).

Which rows apply (``apply_rows``, pure): the row's ``model_version`` is the
served one (another model is another embedding space: its full release
must be loaded first), its release's sequence is above both the served
release's and the *floor*, and above the sequence of the row already
followed for that user. The floor is set when the served release goes
back (a rollback, here or on another replica): the newest release the
store held then, so rows of the releases rolled back from are not applied
again; rows of later releases are.

``TopicFollower`` is the I/O shell: kafka-python in a thread, handing
decoded rows to a callback in batches.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable
from types import MappingProxyType

import numpy as np
from freshtower.publisher.embedding_topic import decode_row
from freshtower.publisher.serving import FollowedRow, ServingState

log = logging.getLogger(__name__)


def sequence_of(version: str) -> int:
    """The sequence of a release version (``00000007-embeddings`` -> 7); -1 if it is none."""
    head = version.split("-", 1)[0] if isinstance(version, str) else ""
    return int(head) if len(head) == 8 and head.isdigit() else -1


@dataclasses.dataclass(frozen=True)
class Applied:
    state: ServingState
    applied: int
    skipped: int


def apply_rows(state: ServingState, rows: Iterable[dict], floor: int = 0) -> Applied:
    """``state`` with the rows that apply (see the module docstring) followed on top.

    """
    base = max(sequence_of(state.version), floor)
    followed = dict(state.followed)
    applied = skipped = 0
    newest_event = state.newest_click_event_time_ms
    through, through_sequence = state.followed_through, sequence_of(state.followed_through or "")
    dim = state.tower.id_dim
    for row in rows:
        sequence = sequence_of(row["release"])
        current = followed.get(row["user_id"])
        if (
            row["model_version"] != state.model_version
            or sequence <= base
            or (current is not None and sequence < current.sequence)
            or row["embedding"].shape != (dim,)
        ):
            skipped += 1
            continue
        vector = np.array(row["embedding"], dtype=np.float32)
        vector.setflags(write=False)
        event_time = int(row["event_time_ms"] or 0)
        followed[row["user_id"]] = FollowedRow(vector, event_time, sequence, row["release"])
        newest_event = max(newest_event, event_time)
        if sequence > through_sequence:
            through, through_sequence = row["release"], sequence
        applied += 1
    if not applied:
        return Applied(state, 0, skipped)
    new = dataclasses.replace(
        state,
        followed=MappingProxyType(followed),
        followed_through=through,
        newest_click_event_time_ms=newest_event,
        newest_click_is_bound=state.newest_click_is_bound and newest_event <= state.newest_click_event_time_ms,
    )
    return Applied(new, applied, skipped)


def carry_rows(old: ServingState | None, new: ServingState, floor: int = 0) -> ServingState:
    """``new`` (a release just loaded) with the rows ``old`` followed that still apply to it."""
    if old is None or not old.followed:
        return new
    rows = [
        {"user_id": u, "release": r.release, "model_version": old.model_version, "event_time_ms": r.event_time_ms, "embedding": r.vector}
        for u, r in old.followed.items()
    ]
    return apply_rows(new, rows, floor).state


class TopicFollower:
    """Reads the topic from its beginning in a thread; ``on_rows(rows)`` gets
    each polled batch of decoded rows (``ready()`` false: wait, nothing is
    served yet to apply them to)."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        on_rows: Callable[[list[dict]], None],
        *,
        ready: Callable[[], bool] = lambda: True,
        on_malformed: Callable[[int], None] = lambda n: None,
        client_id: str = "freshtower-replica",
    ):
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.on_rows, self.ready, self.on_malformed = on_rows, ready, on_malformed
        self.client_id = client_id
        self.read = 0  # messages read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topic-follower", daemon=True)

    def start(self) -> TopicFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception:  # a broker outage: log, wait, reconnect (from the beginning: rows are idempotent)
                log.exception("following %s on %s failed; retrying in 2 s", self.topic, self.bootstrap_servers)
                self._stop.wait(2.0)

    def _follow(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self.client_id,
            group_id=None,  # every replica reads every row
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            request_timeout_ms=30_000,
        )
        try:
            partitions = None
            while partitions is None and not self._stop.is_set():  # the publisher creates the topic
                partitions = consumer.partitions_for_topic(self.topic)
                if partitions is None:
                    consumer.topics()  # refresh the metadata
                    self._stop.wait(1.0)
            if partitions is None:
                return
            assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            consumer.seek_to_beginning(*assigned)
            log.info("following %s (%d partitions) from the beginning", self.topic, len(assigned))
            while not self._stop.is_set():
                if not self.ready():
                    self._stop.wait(0.05)
                    continue
                rows, malformed = [], 0
                for batch in consumer.poll(timeout_ms=200, max_records=10_000).values():
                    for message in batch:
                        try:
                            rows.append(decode_row(message.value))
                        except (ValueError, KeyError, TypeError) as error:
                            malformed += 1
                            log.warning("%s partition %d offset %d: not a user-embeddings row: %s", self.topic, message.partition,
                                        message.offset, error)
                self.read += len(rows) + malformed
                if malformed:
                    self.on_malformed(malformed)
                if rows:
                    self.on_rows(rows)
        finally:
            consumer.close()

