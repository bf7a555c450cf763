"""The streams worker: a Faust app that joins impressions, clicks and rank
logs into minute batches (``freshtower streams``).

Reads top-down like Faust's examples: app -> topics -> tables -> agent ->
timer -> pages, all built by ``create_app(settings)`` (nothing happens at
import). The agent is a thin ``async for`` over micro-batches that hands
raw messages to the pure join (``streams/join.py``) and writes what it
returns; ``StreamProcessor`` is that shell.

Micro-batches: the input topics' fetched batches reach the agent whole,
one Faust event per batch (``streams/faust_transport.py``), because
Faust's per-message path (conductor, channel queue, stream iteration,
sensors) costs more than the join itself. Faust still runs the consumer
group, offsets and commits, the tables and their changelogs, recovery,
the timer and the web endpoint; the agent acks each message itself.

Delivery is at-least-once with idempotent, deterministic sinks (the
embedded broker cannot run Faust's exactly-once mode):

1. An event's effect on a request's state, and the event ID that
   deduplicates it, is one changelog record (table ``join-requests``).
   A micro-batch is acked only once its changelog records, dead letters
   and announcements are on the broker, so committed offsets never run
   ahead of the state.
2. A closed window is written (fsync + atomic rename, deterministic path),
   THEN announced on ``training-batches``, and only then are offsets
   committed and the window marked closed in table ``join-progress``. A
   crash in between rewrites the same window after the restart.
3. Requests whose label-0 window closed are deleted only after a commit
   that covers all events processed before the close, and after the
   progress record saying so is on the broker, so a replay can never
   re-create them and a restart never rewrites a window without them.
4. Their event IDs, which deduplicate copies for a day after
   (``streams/dedup.py``), are on the broker (table ``join-written-ids``)
   before the requests' tombstones are sent, so a restarted worker or the
   partition's next owner still recognises a copy.

Any producer's partitioner: an event on another partition than
murmur2(user_id)'s (a librdkafka producer's CRC32 default) goes, as it
arrived, to its input topic's repartition topic on murmur2's partition
(``streams/topics.py``), acked only once it is there; the partition's owner
reads it as one more source of that partition (so its watermark waits for
the rerouted events too), and the join's dedup counts a copy once.

Scale-out: each input partition number is joined on its own
(``streams/partitions.py``), with its progress record in that partition of
the ``join-progress`` changelog and its own batch files
(``<HHMMSS>-p<k>``), so workers started with the same ``app_id`` share the
partitions through the consumer group (Faust assigns a partition's
changelogs with it), and a partition that moves takes its state, progress
and lineage along.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from pathlib import Path

import faust
import orjson
from faust.types import TP
from freshtower.streams.dead_letters import encode_dead_letter
from freshtower.streams.faust_transport import Transport
from freshtower.streams.join import JoinSettings, StepResult
from freshtower.streams.metrics import StreamMetrics
from freshtower.streams.partitions import PartitionedJoin
from freshtower.streams.ranking_samples import RankingSampleEmitter
from freshtower.streams.sink import BatchSink, write_windows, written_windows
from freshtower.streams.topics import repartition_topics, worker_topics

from freshtower.core.batches import RequestSharingEncoder
from freshtower.core.frequency import FrequencyEstimator
from freshtower.core.settings import Settings

log = logging.getLogger("freshtower.streams")
COMMIT_STALL_WARN_SECONDS = 20.0  # a closed window whose offsets stay uncommitted this long is logged


class StreamsApp(faust.App):
    """Faust's App with the transport of ``streams/faust_transport.py`` and
    without Faust's own per-event statistics (its Monitor sensor costs a
    few microseconds an event; ``streams/metrics.py`` reports instead)."""

    def _new_transport(self):
        return Transport(self.conf.broker_consumer, self)

    def on_init_dependencies(self):
        dependencies = super().on_init_dependencies()
        self.sensors.remove(self.monitor)
        return dependencies


def _wall_ms() -> int:
    return int(time.time() * 1000)


def progress_key(partition: int) -> str:
    """Key of input partition ``partition``'s progress record (open window
    cut, watermark, lineage, frequency state) in table ``join-progress``."""
    return f"progress-{partition}"


class StreamProcessor:
    """The shell around ``PartitionedJoin``: Faust messages in; dead
    letters, changelog writes, batch files and announcements out, each
    input partition with its own progress record, lineage and sink."""

    def __init__(self, settings: Settings, app: faust.App, requests, progress, dead_letters, announcements, written_ids):
        self.settings = settings
        self.app = app
        self.requests = requests
        self.progress = progress
        self.written_ids = written_ids
        self.dead_letters = dead_letters
        self.announcements = announcements
        self.repartition = repartition_topics(settings)  # input topic -> the topic its misplaced events go to
        self.join_settings = JoinSettings.from_config(settings.streams, self.repartition)
        self.kinds = worker_topics(settings)  # the inputs and their repartition topics, each a source of its partition
        self.input_topic_names = set(self.kinds)
        self.processed: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset processed
        self.metrics = StreamMetrics()
        self.lock = asyncio.Lock()
        self.join: PartitionedJoin | None = None
        self.sinks: dict[int, BatchSink] = {}  # input partition -> its sink
        self.lineages: dict[int, str] = {}  # input partition -> ID of its join state's history (see _ensure_join)
        self.encoder = RequestSharingEncoder()  # request IDs are unique across partitions: one cache serves all sinks
        self.needs_rebuild = True
        self.recovered = False  # tables recovered at least once
        self.recovered_open_requests: int | None = None
        self.pending: set[int] = set()  # partitions whose windows closed: commit, then finalize
        self.in_flight: collections.deque = collections.deque()  # (delivery futures, messages) not acked yet
        # Micro-batches processed whose offsets no finished commit covers yet
        # (acked or not) are what a crash now would deliver again. Counted in
        # micro-batch sequence numbers: processed, acked, covered by a commit.
        self.processed_seq = self.acked_seq = self.committed_seq = 0
        self.commit_task: asyncio.Task | None = None
        self.last_batch_end = time.monotonic()
        self.last_idle_tick: float | None = None
        self._caught_up_since: dict = {}  # topic partition -> when it was first seen read to its end
        self.repartition_sources = set(self.kinds) - set(self.repartition)  # the repartition topics
        self.forwarded: dict = {}  # repartition topic partition -> delivery future of the newest copy sent there
        self.last_log = time.monotonic()
        self.stuck_since: float | None = None  # since when a partition's windows closed but its commit lags (a warning)
        self.last_stuck_warning = 0.0
        self.busy_seconds = 0.0  # time spent in the agent (benchmarks: events_in / busy_seconds)
        self.micro_batches = 0
        self.first_batch_at: float | None = None  # wall clock: start of the first batch, end of the last
        self.last_batch_at: float | None = None

    # --- recovery ---------------------------------------------------------------

    async def on_recovered(self) -> None:
        """Table recovery finished (start or rebalance): rebuild lazily."""
        self.needs_rebuild = True
        self.recovered = True
        self.processed.clear()  # offsets restart from the committed ones
        self.committed_seq = self.acked_seq = self.processed_seq  # nothing of the old assignment is pending

    def _state_mapping(self):
        store = self.requests.data
        # The memory store keeps a plain dict: the join mutates its values in
        # place and writes them to the changelog itself.
        return store.data if isinstance(getattr(store, "data", None), dict) else store

    async def _ensure_join(self) -> None:
        """(Re)build the join of the partitions this worker owns now, each
        from its progress record (after a start or a rebalance)."""
        if not self.needs_rebuild:
            return
        assigned, _ = self.app.consumer.input_partitions(self.input_topic_names, self.processed)
        owned = sorted({partition for _, partition in assigned})
        progress = {p: dict(self.progress.data.get(progress_key(p)) or {}) for p in owned}
        new = [p for p in owned if "lineage" not in progress[p]]
        for p in new:
            # A new join state (first start, or the broker lost its topics):
            # its batches carry this ID, and a restart only ever rewrites or
            # removes batches of its own lineage.
            progress[p]["lineage"] = uuid.uuid4().hex[:12]
        if new:
            await self._write_progress({p: progress[p] for p in new})
        previous = self.join
        self.join = PartitionedJoin(self.join_settings, self._state_mapping(), progress, self.kinds)
        if previous is not None:
            self.join.counters.update(previous.counters)  # a rebalance: the figures go on
        self.lineages = {p: progress[p]["lineage"] for p in owned}
        restored = self._restore_written_ids(set(owned))
        f = self.settings.frequency
        cuts = [core.open_from_ms for core in self.join.cores.values()]
        written = written_windows(self.settings.batches_dir, None if None in cuts else min(cuts, default=None))
        self.sinks = {
            p: BatchSink.open(
                self.settings.batches_dir,
                f"{self.settings.streams.app_id}:{self.lineages[p]}",
                lambda: FrequencyEstimator(f.buckets, f.hashes, f.alpha),
                progress[p],
                core.open_from_ms,
                partition=p,
                written=written,
                encoder=self.encoder,
                emitter=self._new_emitter(),
            )
            for p, core in self.join.cores.items()
        }
        self.pending = {p for p, core in self.join.cores.items() if core.pending_finalization > 0}
        self.needs_rebuild = False
        self.recovered_open_requests = self.join.open_requests
        log.info(
            "join state ready: partitions %s, %d open requests, %d written-out event IDs remembered, open_from_ms=%s, watermark_ms=%s",
            owned,
            self.join.open_requests,
            restored,
            {p: core.open_from_ms for p, core in self.join.cores.items()},
            {p: core.watermark_ms for p, core in self.join.cores.items()},
        )

    def _restore_written_ids(self, owned: set[int]) -> int:
        """Load the owned partitions' chunk records of written-out event IDs
        into the join's memory of them; drop the others (another worker's
        now; their changelog keeps them). Returns how many IDs it holds."""
        store = self.written_ids.data
        mapping = store.data if isinstance(getattr(store, "data", None), dict) else store
        joined_ids = self.join.joined_ids
        for key, value in list(mapping.items()):
            if int(value["partition"]) in owned:
                joined_ids.restore(key, value)
            else:
                del mapping[key]
        if self.join.watermark_ms is not None:
            joined_ids.expire(self.join.watermark_ms)  # the tombstones go out with the next changelog records
        return len(joined_ids)

    def _new_emitter(self) -> RankingSampleEmitter | None:
        if not self.settings.streams.ranking_samples:
            return None
        p = self.settings.prerank
        return RankingSampleEmitter(p.category_feature, p.teacher_stage, self.join_settings.join_window_ms)

    # --- the agent's and the timer's work ------------------------------------------

    async def on_events(self, messages) -> None:
        """A fetched batch of input messages (Faust's ConsumerMessage:
        topic, partition, offset, key, value), in micro-batches; each
        acked once its effects are delivered."""
        size = self.settings.streams.micro_batch_size
        for start in range(0, len(messages), size):
            await self._process(messages[start : start + size])

    def _idle_sources(self, caught_up, assigned) -> set:
        """Topic partitions read to their end for ``idle_seconds`` (wall).

        Only these leave the watermark. The moment a partition catches up is
        not enough: a producer writes a request's rank log, impression and
        click to three topics a moment apart, and a rank-logs partition
        dropped from the watermark as soon as it was read to its end let the
        clicks close a window before the rank log (its hard negatives)
        arrived; in a fast replay, the allowed lateness is milliseconds of
        wall time."""
        now = time.monotonic()
        since = self._caught_up_since
        for tp in list(since):
            if tp not in caught_up:
                del since[tp]
        for tp in caught_up:
            since.setdefault(tp, now)
        grace = self.settings.streams.idle_seconds
        idle = {tp for tp, t in since.items() if now - t >= grace or tp[0] in self.repartition_sources}
        return idle - self._awaiting_copies(assigned)

    def _awaiting_copies(self, assigned) -> set:
        """Repartition topic partitions this worker sent copies to and has
        not read past yet. A repartition topic needs no idle grace (its
        copies are sent by workers, which read their inputs first), but a
        copy this worker sent may not be in the last fetch's end offset."""
        awaiting = set()
        for tp, future in list(self.forwarded.items()):
            if not future.done() or future.cancelled() or future.exception() is not None:
                awaiting.add(tp)
            elif self.processed.get(tp, 0) > future.result().offset:
                del self.forwarded[tp]  # read back
            elif tp in assigned:
                awaiting.add(tp)
            else:
                del self.forwarded[tp]  # another worker's partition now
        return awaiting

    async def _process(self, messages) -> None:
        async with self.lock:
            started = time.monotonic()
            await self._ensure_join()
            # The previous micro-batch is acked by now, so a commit here
            # covers everything processed before the last window close.
            await self._commit_and_finalize()
            await self._bound_redelivery()
            processed = self.processed
            for m in messages:
                processed[m.topic, m.partition] = m.offset + 1
            assigned, caught_up = self.app.consumer.input_partitions(self.input_topic_names, processed)
            results = self.join.process(messages, _wall_ms(), assigned, self._idle_sources(caught_up, assigned))
            # Acked = may be committed, so only once its changelog records,
            # dead letters and announcements are on the broker (a failed
            # delivery raises and stops the worker, unacked). The next
            # micro-batch is processed while these are in flight.
            self.in_flight.append((await self._emit(results), messages))
            self.processed_seq += 1
            await self._ack_delivered(wait=False)
            self._commit_soon()
            self.last_batch_end = time.monotonic()
            self.busy_seconds += self.last_batch_end - started
            self.micro_batches += 1
            self.last_batch_at = time.time()
            if self.first_batch_at is None:
                self.first_batch_at = self.last_batch_at - (self.last_batch_end - started)
            self.last_idle_tick = None
        await asyncio.sleep(0)  # let the web endpoint, timers and heartbeats run between micro-batches

    async def on_tick(self) -> None:
        """Every second: report; when the sources are idle, commit and
        finalize, and let the watermarks follow the clock."""
        if self.app.rebalancing or not self.recovered:
            return
        now = time.monotonic()
        s = self.settings.streams
        async with self.lock:
            await self._ensure_join()
            # Idle = nothing processed for a while AND every input partition
            # read to its end; a slow worker is not an idle source.
            assigned, caught_up = self.app.consumer.input_partitions(self.input_topic_names, self.processed)
            idle = now - self.last_batch_end >= s.idle_seconds and assigned <= caught_up
            await self._ack_delivered(wait=idle)
            self._commit_soon()
            if not idle:
                self.last_idle_tick = None
            else:
                await self._commit_and_finalize()
                # Sources idle only now (read to their end, quiet for idle_seconds) leave the watermark
                # even after the last message: a topic with no events at all must not hold it at None.
                await asyncio.gather(*await self._emit(self.join.settle(_wall_ms(), assigned, self._idle_sources(caught_up, assigned))))
                if self.last_idle_tick is None:
                    self.last_idle_tick = now  # the idle clock starts now
                elif s.idle_advance_rate > 0:
                    step_ms = int((now - self.last_idle_tick) * s.idle_advance_rate * 1000)
                    # Event time may run ahead of the clock in a replay, never past it.
                    results = self.join.advance(step_ms, _wall_ms()) if step_ms > 0 else []
                    if results:
                        self.last_idle_tick = now
                        await asyncio.gather(*await self._emit(results))
            summary = self.metrics.update(self.join.counters, self.join.watermark_ms, self.join.open_requests, _wall_ms())
        if now - self.last_log >= s.log_every_seconds:
            self.last_log = now
            log.info(
                "events_in=%d events_per_second=%.0f records_out=%d records_per_second=%.0f join_hit_rate=%.4f "
                "late=%d duplicates=%d dead_letters=%d batches=%d watermark_lag_seconds=%s open_requests=%d",
                summary["events_in"],
                summary["events_per_second"],
                summary["records_out"],
                summary["records_per_second"],
                summary["join_hit_rate"],
                summary["late_records"],
                summary["duplicates"],
                summary["dead_letters"],
                summary["batches"],
                summary["watermark_lag_seconds"],
                summary["open_requests"],
            )

    def stats(self) -> dict:
        if self.join is None:
            return {"ready": False}
        join = self.join
        summary = self.metrics.update(join.counters, join.watermark_ms, join.open_requests, _wall_ms())
        return {
            "ready": True,
            "partitions": sorted(join.cores),
            "open_from_ms": join.open_from_ms,
            "partition_watermarks_ms": {str(p): core.watermark_ms for p, core in join.cores.items()},
            "recovered_open_requests": self.recovered_open_requests,
            "pending_finalization": join.pending_finalization,
            "busy_seconds": round(self.busy_seconds, 3),
            "micro_batches": self.micro_batches,
            "first_batch_at": self.first_batch_at,
            "last_batch_at": self.last_batch_at,
            **summary,
        }

    # --- output -------------------------------------------------------------------

    async def _emit(self, results: list[tuple[int, StepResult]]) -> list:
        """Send what the partitions' ``results`` hold; return the delivery
        futures, which must all succeed before the events behind them are
        acked."""
        keep_bytes = self.settings.streams.max_event_bytes
        pending = []
        for _, result in results:
            for letter in result.dead_letters:
                pending.append(await self.dead_letters.send(key=letter.key, value=encode_dead_letter(letter, keep_bytes)))
            for message, partition in result.rerouted:  # acked (committed) only once the copy is on the broker
                again = self.repartition[message.topic]
                future = await self.app.producer.send(again, message.key, message.value, partition, None, None)
                pending.append(future)
                self.forwarded[again, partition] = future  # the newest copy: that source is not idle until read past it
        pending += await self._write_changelog()
        pending += await self._write_written_ids()
        closing = [(partition, result) for partition, result in results if result.closed_to_ms is not None]
        # Every partition's windows closed now, written together (one pair of
        # directory fsyncs for them all), each durable before it is announced.
        windows = [(self.sinks[partition], window) for partition, result in closing for window in result.closed]
        for (_, window), announcement in zip(windows, write_windows(windows)):
            pending.append(await self.announcements.send(key=announcement["window_start"].encode(), value=_json_bytes(announcement)))
            log.debug(
                "wrote batch %s: %d records (%d clicked), %d late",
                announcement["path"],
                len(window.samples),
                announcement["positives"],
                window.late_records,
            )
        for partition, result in closing:
            sink = self.sinks[partition]
            sink.remove_stale(result.closed_from_ms, result.closed_to_ms)
            sink.closed_through(result.closed_to_ms)  # after its batches: never ahead of them
            self.pending.add(partition)
        return pending

    async def _write_changelog(self) -> list:
        """The changed requests as changelog records (the table's JSON
        encoding), one producer batch per partition: Faust's per-message
        send path costs more than the join itself. Returns the batches'
        delivery futures."""
        cores = [core for core in self.join.cores.values() if core.dirty or core.deleted]
        if not cores:
            return []
        producer = _aiokafka_producer(self.app)
        topic = self.requests.changelog_topic.get_topic_name()
        state = self.join.requests
        dumps = orjson.dumps
        by_partition: dict[int, list] = {}
        for core in cores:
            for request_id, partition in core.dirty.items():
                by_partition.setdefault(partition, []).append((dumps(request_id), dumps(state[request_id])))
            for request_id, partition in core.deleted.items():
                by_partition.setdefault(partition, []).append((dumps(request_id), None))  # tombstone: recovery deletes the key
            core.dirty.clear()
            core.deleted.clear()
        futures = []
        for partition, records in by_partition.items():
            batch = producer.create_batch()
            for key, value in records:
                if batch.append(timestamp=None, key=key, value=value) is None:  # full
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    if batch.append(timestamp=None, key=key, value=value) is None:
                        raise ValueError(f"join state of {key!r} does not fit a producer batch ({len(value or b''):,} bytes)")
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures

    async def _write_written_ids(self) -> list:
        """New chunk records of written-out event IDs, and tombstones for
        the expired ones, each in its partition of the ``join-written-ids``
        changelog. Returns the delivery futures."""
        joined_ids = self.join.joined_ids
        records = [(p, key, value) for key, value in joined_ids.chunk_records() for p in [value["partition"]]]
        records += [(p, key, None) for p, key in joined_ids.take_expired()]
        if not records:
            return []
        topic = self.written_ids.changelog_topic.get_topic_name()
        data = self.written_ids.data
        futures = []
        for partition, key, value in records:
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value  # what this worker would recover, so a rebuild in place reads it too
            futures.append(
                await self.app.producer.send(topic, orjson.dumps(key), None if value is None else orjson.dumps(value), partition, None, None)
            )
        return futures

    async def _ack_delivered(self, wait: bool) -> None:
        """Ack the micro-batches whose output the broker has, oldest first;
        ``wait``: all of them, waiting for their deliveries."""
        ack = self.app.consumer.ack
        while self.in_flight:
            futures, messages = self.in_flight[0]
            if not wait and not all(f.done() for f in futures):
                return
            await asyncio.gather(*futures)
            for message in messages:
                ack(message)
            self.in_flight.popleft()
            self.acked_seq += 1

    # --- offsets: committed soon after delivery, the redelivery bounded ------------
    #
    # Faust commits acked offsets every ``commit_interval_seconds``; on its own
    # that let a crash deliver again whatever the worker processed in the last
    # interval plus the micro-batches in flight, a share of the stream that grows
    # with the worker's speed (thousands of events a second). So every ack is
    # followed by a commit in the background (one at a time), and a micro-batch
    # is processed only while fewer than ``max_uncommitted_micro_batches`` are
    # processed but not covered by a finished commit: a crash delivers again at
    # most that many micro-batches plus the one being processed.

    def _commit_soon(self) -> None:
        """Start a background commit of what is acked, unless one runs."""
        task = self.commit_task
        if task is not None:
            if not task.done():
                return
            self.commit_task = None
            task.result()  # a failed commit stops the worker (its events are read again)
        if self.acked_seq > self.committed_seq:
            self.commit_task = asyncio.ensure_future(self._commit_acked())

    async def _commit_acked(self) -> None:
        """Commit every acked offset; afterwards the micro-batches acked
        before the call are covered."""
        covers = self.acked_seq
        consumer = self.app.consumer
        # Two calls: if a periodic commit is running, the first only waits
        # for it, and it may have started before our last acks.
        await consumer.commit()
        await consumer.commit()
        self.committed_seq = max(self.committed_seq, covers)

    async def _bound_redelivery(self) -> None:
        """Before a micro-batch: wait until fewer than the allowed number of
        processed micro-batches are uncommitted."""
        if self.processed_seq - self.committed_seq < self.settings.streams.max_uncommitted_micro_batches:
            return
        await self._ack_delivered(wait=True)
        if self.commit_task is not None:
            task, self.commit_task = self.commit_task, None
            await task
        if self.acked_seq > self.committed_seq:
            await self._commit_acked()

    async def _commit_and_finalize(self) -> None:
        if not self.pending:
            return
        await self._ack_delivered(wait=True)
        consumer = self.app.consumer
        # Two calls: if a periodic commit is running, the first only waits
        # for it, and it may have started before our last acks.
        covers = self.acked_seq
        await consumer.commit()
        await consumer.commit()
        self.committed_seq = max(self.committed_seq, covers)
        # A partition's progress is recorded only once the commit covers all
        # it processed; one revoked meanwhile (its commit discarded) belongs
        # to another worker now and is left to it.
        behind = consumer.uncommitted_partitions(self.input_topic_names, self.processed)
        ready = self.pending - behind
        self._warn_if_stuck(behind)
        if not ready:
            return
        # The progress must be durable before any deletion is: a restart that
        # saw a request deleted but its window still open would rewrite the
        # window without it.
        await self._write_progress(
            {
                p: {
                    **self.join.cores[p].progress(),
                    "lineage": self.lineages[p],
                    "frequency_window_ms": self.sinks[p].progress.frequency_window_ms,
                    "frequency_step": self.sinks[p].progress.frequency_step,
                }
                for p in ready
            }
        )
        for p in ready:
            core = self.join.cores[p]
            core.finalize()
            self.encoder.forget(core.deleted)  # their samples are all written
        # Their event IDs are on the broker before the requests' tombstones:
        # a crash in between leaves the requests open, never forgotten.
        await asyncio.gather(*await self._write_written_ids())
        await asyncio.gather(*await self._write_changelog())
        self.pending -= ready

    def _warn_if_stuck(self, behind: set[int]) -> None:
        """Partitions whose windows closed but whose offsets have not been
        committed for ``COMMIT_STALL_WARN_SECONDS``: a warning naming what
        the commit waits on (the join cannot finalize them meanwhile)."""
        stuck = self.pending & behind
        now = time.monotonic()
        if not stuck:
            self.stuck_since = None
            return
        if self.stuck_since is None:
            self.stuck_since = now
        if now - self.stuck_since < COMMIT_STALL_WARN_SECONDS or now - self.last_stuck_warning < COMMIT_STALL_WARN_SECONDS:
            return
        self.last_stuck_warning = now
        consumer = self.app.consumer
        assigned = consumer.assignment()
        state = {
            f"{topic}-{partition}": {"processed": offset, "assigned": (topic, partition) in {(tp.topic, tp.partition) for tp in assigned},
                                     **consumer.commit_state(TP(topic, partition))}
            for (topic, partition), offset in sorted(self.processed.items())
            if partition in stuck and topic in self.input_topic_names
        }
        log.warning(
            "partitions %s: windows closed %.0f s ago but their offsets are not committed, so their requests stay open: %s",
            sorted(stuck), now - self.stuck_since, state,
        )

    async def _write_progress(self, records: dict[int, dict]) -> None:
        """Store each partition's progress record in that partition of the
        progress changelog (so it moves with the partition) and wait until
        the broker has them."""
        topic = self.progress.changelog_topic.get_topic_name()
        for partition, progress in records.items():
            self.progress.data[progress_key(partition)] = progress
            await self.app.producer.send(topic, orjson.dumps(progress_key(partition)), orjson.dumps(progress), partition, None, None)
        await self.app.producer.flush()


def _aiokafka_producer(app: faust.App):
    """The aiokafka producer inside Faust's (the one Faust flushes before
    it commits offsets), for batch sends; a private Faust attribute, read
    in this one place."""
    return app.producer._ensure_producer()


def _json_bytes(value) -> bytes:
    return orjson.dumps(value)


def _broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap.split(",") if server.strip())


def create_app(settings: Settings) -> tuple[faust.App, StreamProcessor]:
    """The Faust app of the streams worker, and its processor (for stats)."""
    s = settings.streams
    k = settings.kafka_client
    t = settings.topics

    app = StreamsApp(
        s.app_id,
        broker=_broker_url(settings.bootstrap_servers),
        store="memory://",  # the state lives in memory; its changelog topic makes it durable
        datadir=str(Path(settings.data_dir) / "streams"),
        topic_partitions=s.partitions,
        topic_replication_factor=1,
        processing_guarantee="at_least_once",  # exactly_once needs a transactional producer Tansu lacks
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=k.session_timeout_ms / 1000,
        broker_heartbeat_interval=k.heartbeat_interval_ms / 1000,
        broker_rebalance_timeout=k.rebalance_timeout_ms / 1000,
        broker_commit_interval=s.commit_interval_seconds,
        table_standby_replicas=0,
        stream_buffer_maxsize=max(4096, 2 * s.micro_batch_size),
        web_enabled=s.web_port != 0,
        web_port=s.web_port or 6066,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        worker_redirect_stdouts=False,
        producer_max_batch_size=512 * 1024,  # changelog records go out a partition-batch at a time
    )
    app.fetch_max_wait_ms = s.fetch_max_wait_ms  # the input fetch's longest wait (streams/faust_transport.py)

    # The inputs and their repartition topics, co-partitioned (same partition count, same consumers).
    source = app.topic(*worker_topics(settings), key_serializer="raw", value_serializer="raw", partitions=s.partitions)
    dead_letters = app.topic(t.dead_letters, key_serializer="raw", value_serializer="raw", partitions=1)
    announcements = app.topic(t.training_batches, key_serializer="raw", value_serializer="raw", partitions=1)

    # Keys and values are JSON (Faust's default codec, orjson underneath).
    requests = app.Table("join-requests", partitions=s.partitions, help="request_id -> join state")
    progress = app.Table("join-progress", partitions=s.partitions, help="the window cut and watermark")
    written_ids = app.Table("join-written-ids", partitions=s.partitions, help="event IDs of written-out requests, in chunks (streams/dedup.py)")

    processor = StreamProcessor(settings, app, requests, progress, dead_letters, announcements, written_ids)
    requests.on_recover(processor.on_recovered)

    # Fetched batches of the input topics reach the agent whole (see
    # streams/faust_transport.py): one Faust event per batch, not per message.
    fetched = app.channel(maxsize=4)
    app.topics.add(source)  # subscribe and enable acks, although no agent reads the topic itself
    app.direct_topics = frozenset(source.topics)

    async def hand_over(messages):
        await fetched.send(value=messages)

    app.direct_handler = hand_over

    @app.agent(fetched, name="join-events")
    async def join_events(batches):
        async for messages in batches:
            try:
                await processor.on_events(messages)
            except Exception as error:  # unacked events are read again after a restart
                log.exception("join failed; stopping the worker")
                await app.crash(error)
                raise

    @app.timer(interval=1.0, name="watermark-clock")
    async def watermark_clock():
        try:  # the idle clock closes windows too (the first ones wait for idle sources): the same stop as the agent's
            await processor.on_tick()
        except Exception as error:
            log.exception("join failed; stopping the worker")
            await app.crash(error)
            raise

    @app.page("/metrics")
    async def metrics(web, request):
        return web.bytes(processor.metrics.exposition(), content_type="text/plain; version=0.0.4")

    @app.page("/stats")
    async def stats(web, request):
        return web.json(processor.stats())

    return app, processor


def tune_gc() -> None:
    """Collect young objects less often. The join allocates a few dicts and
    lists per event and keeps tens of thousands of requests alive, so with
    CPython's default thresholds (700, 10, 10) the cycle collector took ~30%
    of the join's time (benchmarks/bench_streams.py); at (50000, 20, 100)
    about 8%. Nothing it holds relies on prompt cycle collection."""
    import gc

    gc.set_threshold(50_000, 20, 100)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the worker until SIGTERM / Ctrl-C (Faust handles both)."""
    import mode.loop

    tune_gc()
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    if settings.streams.event_loop == "uvloop":
        mode.loop.use("uvloop")
    from freshtower.streams.topics import ensure_topics

    ensure_topics(settings)
    (Path(settings.data_dir) / "streams").mkdir(parents=True, exist_ok=True)
    app, _ = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, redirect_stdouts=False, quiet=True)
    worker.execute_from_commandline()
