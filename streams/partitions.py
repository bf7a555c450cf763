"""The join split by input partition, so that several streams workers can
share the input topics. Pure: no Kafka, files or clocks.

Producers key every event by ``user_id`` with one partitioner, so a
request's impression, clicks and rank logs share a partition number across
the three input topics, and each partition number can be joined on its
own: one ``JoinCore`` per partition, with its own watermark, window cut,
progress record and batch files (``<HHMMSS>-p<k>``). Whichever worker of
the consumer group owns partition k, and whenever it moves, partition k's
batches are the same: a pure function of partition k's events (and of
when its windows close, which decides what counts as late).

Time: a partition's watermark is the minimum, over its three topic
partitions still being read, of their largest event time (``JoinCore``).
A partition read to its end on all three topics (idle) follows the
*frontier* of the worker's other partitions: the smallest watermark among
those still being read, or, when every partition is idle, the largest. So
a quiet partition neither holds its windows open forever nor runs ahead of
data still to come on the others. A partition that has seen no event is
left alone: it has nothing to close.

Repartition topics (``JoinSettings.repartition``) are more sources of
their partition. A micro-batch that sends copies to one (events a producer
put on the wrong partition) keeps that source out of the idle set for the
step, so its partition's watermark waits for the copies whichever core
runs first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, MutableMapping

from freshtower.streams.dedup import JoinedIds
from freshtower.streams.join import DEFAULT_KINDS, JoinCore, JoinSettings, StepResult
from freshtower.streams.placement import Placement

TopicPartition = tuple[str, int]  # (topic, partition)


class PartitionedJoin:
    """The partitions one worker owns, a ``JoinCore`` each, over one
    ``requests`` mapping (request_id -> state; each state names its
    partition). Counters are shared, so the worker's figures survive a
    partition moving away."""

    def __init__(
        self,
        settings: JoinSettings,
        requests: MutableMapping[str, dict],
        progress: Mapping[int, dict | None],
        kinds: Mapping[str, str] = DEFAULT_KINDS,
    ):
        """``progress``: partition -> its stored progress (None: a new one),
        for every partition this worker owns. States of other partitions
        are dropped from ``requests``: they belong to another worker now
        (their changelog keeps them, so no tombstones)."""
        self.settings = settings
        self.requests = requests
        self.kinds = dict(kinds)
        self.counters: Counter[str] = Counter()
        for request_id in [r for r, state in requests.items() if state["partition"] not in progress]:
            del requests[request_id]
        self.cores: dict[int, JoinCore] = {}
        joined_ids = None
        for partition, stored in sorted(progress.items()):
            core = self.cores[partition] = JoinCore(settings, requests, stored, self.kinds, partition=partition)
            core.counters = self.counters
            # One memory of written-out event IDs for all of the worker's partitions:
            # a copy that arrives on another partition is recognised too.
            # (``is None``, not ``or``: an empty memory is falsy, and each core kept its own.)
            joined_ids = core.joined_ids = core.joined_ids if joined_ids is None else joined_ids
        self.joined_ids = joined_ids if joined_ids is not None else JoinedIds(settings.dedup_horizon_ms)
        self.placement = Placement(settings.partitions) if settings.partitions and settings.repartition else None
        if self.placement is not None:
            for core in self.cores.values():
                core.placement = self.placement  # one cache of murmur2 placements for the worker

    def process(self, messages, now_ms: int, assigned: set[TopicPartition], caught_up: set[TopicPartition]) -> list[tuple[int, StepResult]]:
        """A micro-batch of raw messages (any partitions, in arrival order),
        each partition's messages to its core; then idle partitions follow
        the frontier. Returns (partition, result) in the order they happened.

        ``assigned``: the input (topic, partition)s this worker reads;
        ``caught_up``: those read to their end."""
        by_partition: dict[int, list] = {}
        for message in messages:
            batch = by_partition.get(message.partition)
            if batch is None:
                batch = by_partition[message.partition] = []
            batch.append(message)
        if self.placement is not None:
            # A repartition topic partition about to receive copies from this batch is not idle, even
            # if read to its end now: its partition's watermark must wait for them, whichever
            # partition's core runs first.
            caught_up = caught_up - self._incoming(messages)
        results = []
        for partition, batch in by_partition.items():
            own = {tp for tp in assigned if tp[1] == partition}
            results.append((partition, self.cores[partition].process(batch, now_ms, own, own & caught_up)))
        results += self._follow_frontier(assigned, caught_up)
        return results

    def _incoming(self, messages) -> set[TopicPartition]:
        """The repartition topic partitions that ``messages`` will send copies to."""
        repartition_of = self.settings.repartition_of
        partition_of = self.placement.partition
        incoming = set()
        for message in messages:
            again = repartition_of.get(message.topic)
            if again is not None and message.key is not None and (target := partition_of(message.key)) != message.partition:
                incoming.add((again, target))
        return incoming

    def _follow_frontier(self, assigned: set[TopicPartition], caught_up: set[TopicPartition]) -> list[tuple[int, StepResult]]:
        reading = {tp[1] for tp in assigned - caught_up}
        active = [core for p, core in self.cores.items() if p in reading]
        if active:
            if any(core.watermark_ms is None for core in active):
                return []  # a partition with unread events whose time is unknown
            frontier = min(core.watermark_ms for core in active)
        else:
            marks = [core.watermark_ms for core in self.cores.values() if core.watermark_ms is not None]
            if not marks:
                return []
            frontier = max(marks)
        return [
            (p, core.advance(frontier))
            for p, core in self.cores.items()
            if p not in reading and core.watermark_ms is not None and core.watermark_ms < frontier
        ]

    def settle(self, now_ms: int, assigned: set[TopicPartition], idle: set[TopicPartition]) -> list[tuple[int, StepResult]]:
        """No new messages, but ``idle`` may have grown: let every
        partition's watermark leave its idle sources. A topic partition that
        never gets an event (a data set without rank logs) holds the
        watermark at None until it has been read to its end for
        ``idle_seconds``, which in a fast replay is after the last message."""
        results = []
        for partition, core in self.cores.items():
            own = {tp for tp in assigned if tp[1] == partition}
            results.append((partition, core.process([], now_ms, own, own & idle)))
        results += self._follow_frontier(assigned, idle)
        return results

    def advance(self, step_ms: int, limit_ms: int) -> list[tuple[int, StepResult]]:
        """Idle sources: move every partition's watermark to the largest one
        plus ``step_ms``, never past ``limit_ms`` (the wall clock)."""
        marks = [core.watermark_ms for core in self.cores.values() if core.watermark_ms is not None]
        if not marks:
            return []
        target = min(max(marks) + step_ms, limit_ms)
        return [(p, core.advance(target)) for p, core in self.cores.items() if core.watermark_ms is not None and core.watermark_ms < target]

    # --- figures ----------------------------------------------------------------

    @property
    def watermark_ms(self) -> int | None:
        """The oldest watermark among partitions that have one."""
        marks = [core.watermark_ms for core in self.cores.values() if core.watermark_ms is not None]
        return min(marks) if marks else None

    @property
    def open_from_ms(self) -> int | None:
        cuts = [core.open_from_ms for core in self.cores.values() if core.open_from_ms is not None]
        return min(cuts) if cuts else None

    @property
    def open_requests(self) -> int:
        return len(self.requests)  # only owned partitions' states are left in it

    @property
    def pending_finalization(self) -> int:
        return sum(core.pending_finalization for core in self.cores.values())
