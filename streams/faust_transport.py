"""The Kafka transport the streams worker plugs into Faust: Faust's own
aiokafka driver with two methods replaced. Both are measured or observed
problems, not taste:

1. **Fetch loop.** Faust hands every message to the streams through
   ``Service.wait_first(callback(message), suspend_flow.wait())``: two
   tasks and an ``asyncio.wait`` per message, about half of a trivial
   agent's CPU time (cProfile). ``_drain_messages`` here does the same
   work once per fetched batch instead: the batch is delivered message by
   message inside one ``wait_first``, so a rebalance (``suspend_flow``)
   still interrupts delivery, read offsets and gaps are tracked as Faust
   does, and everything else (acks, commits, flow control) is Faust's.
   With uvloop this takes a trivial ``stream.take`` agent from ~5-6k to
   ~11-15k events/s on this 2-core machine (``benchmarks/bench_streams.py``
   measures the whole worker).

2. **End offsets.** Table recovery reads each changelog partition up to
   its end offset from ListOffsets(latest), which the embedded Tansu
   broker gets wrong: it answers the start of the last record batch + 1,
   not the high watermark (3 batches of 10 -> 21, not 30). Recovery would
   stop early and lose the tail of a table. ``highwaters`` here fetches
   from just before the reported end and takes the high watermark from
   the fetch response, which is right on Tansu and on Apache Kafka alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

log = logging.getLogger(__name__)

# A fetch response (long-polled for fetch_max_wait_ms, 0.5 s by default) at
# least this recent makes a partition's high watermark current.
FETCH_FRESH_SECONDS = 3.0


def true_end_offsets(bootstrap: str, reported: Mapping[TP, int], timeout: float = 10.0) -> dict[TP, int]:
    """High watermarks from fetch responses, starting just before the
    (possibly too low) ``reported`` end offsets."""
    from kafka import KafkaConsumer, TopicPartition

    if not reported:
        return {}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, client_id="freshtower-end-offsets")
    try:
        partitions = {TopicPartition(tp.topic, tp.partition): tp for tp in reported}
        consumer.assign(list(partitions))
        for kafka_tp, tp in partitions.items():
            consumer.seek(kafka_tp, max(int(reported[tp] or 0) - 1, 0))
        ends: dict[TP, int] = {}
        deadline = time.monotonic() + timeout
        while len(ends) < len(partitions) and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200, max_records=1)
            for kafka_tp, tp in partitions.items():
                highwater = consumer.highwater(kafka_tp)
                if highwater is not None:
                    ends[tp] = max(highwater, int(reported[tp] or 0))
        missing = [tp for tp in reported if tp not in ends]
        if missing:
            raise TimeoutError(f"no fetch response within {timeout:.0f} s for {missing}")
        return ends
    finally:
        consumer.close()


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with the input fetch's longest wait from the
    settings (``streams.fetch_max_wait_ms``, put on the app as
    ``fetch_max_wait_ms``): Faust passes a fixed 1,500 ms to aiokafka, and
    the embedded broker holds a fetch for much of it although records are
    there (measured with aiokafka alone, a record every 20 ms over 12
    partitions: delivered 380 ms after it was sent at p50 with a 1,500 ms
    wait, 15 ms with 50 ms)."""

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(self.app, "fetch_max_wait_ms", None)
        if wait_ms is not None:
            # aiokafka keeps the constructor argument here and hands it to its fetcher at start
            if not hasattr(consumer, "_fetch_max_wait_ms"):
                raise RuntimeError("this aiokafka version keeps fetch_max_wait_ms elsewhere: streams.fetch_max_wait_ms cannot be applied")
            consumer._fetch_max_wait_ms = int(wait_ms)
        return consumer


class Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        reported = dict(await super().highwaters(*partitions))
        bootstrap = ",".join(f"{url.host}:{url.port or 9092}" for url in self.app.conf.broker_consumer)
        try:
            return await asyncio.to_thread(true_end_offsets, bootstrap, reported)
        except Exception as error:  # fall back to the broker's answer, loudly
            log.error("could not confirm end offsets from fetch responses (%r); using ListOffsets answers %s", error, reported)
            return reported

    def input_partitions(self, topics: set[str], processed: dict[tuple[str, int], int]) -> tuple[set, set]:
        """(assigned, caught up) partitions of ``topics`` as (topic, partition).

        Caught up = processed (``processed``: next offset per partition, kept
        by the caller) or committed up to the high watermark of the last
        fetch response. Such a partition is idle, not merely slow, and must
        not hold the event-time watermark back. Delivered-but-unprocessed
        events (Faust's stream buffer) do not count. Nor does a partition
        whose last fetch response is older than ``FETCH_FRESH_SECONDS``: its
        high watermark is stale (the broker is down or restarting), so the
        worker cannot know it is at the end, and an idle clock must not move
        the watermark past events the broker still holds."""
        assigned: set[str] = set()
        caught_up: set[str] = set()
        now_ms = time.time() * 1000
        for tp in self.assignment():
            if tp.topic not in topics:
                continue
            name = (tp.topic, tp.partition)
            assigned.add(name)
            highwater = self.highwater(tp)
            if highwater is None:
                continue
            fetched_ms = self.last_fetch_ms(tp)
            if fetched_ms is None or now_ms - fetched_ms > FETCH_FRESH_SECONDS * 1000:
                continue
            if max(processed.get(name, 0), self._committed_offset[tp] or 0) >= highwater:
                caught_up.add(name)
        return assigned, caught_up

    def last_fetch_ms(self, tp: TP) -> float | None:
        """Wall-clock ms of the last fetch response that carried ``tp``
        (aiokafka updates it on every response, with or without records)."""
        try:
            return self._thread._ensure_consumer().last_poll_timestamp(tp)
        except (AssertionError, AttributeError):  # not assigned, or not started
            return None

    def uncommitted_partitions(self, topics: set[str], processed: dict[tuple[str, int], int]) -> set[int]:
        """Partition numbers with an offset of ``topics`` processed
        (``processed``: next offset per (topic, partition)) but not
        committed, including partitions no longer assigned (Faust discards
        their commits)."""
        assigned = self.assignment()
        behind = set()
        for tp in {TP(topic, partition) for topic, partition in processed if topic in topics}:
            if tp not in assigned or (self._committed_offset[tp] or 0) < processed[tp.topic, tp.partition]:
                behind.add(tp.partition)
        return behind

    def commit_state(self, tp: TP) -> dict:
        """What Faust's commit of ``tp`` waits on (for a warning): its
        committed offset, the lowest acked offsets and the known gaps."""
        acked = sorted(self._acked.get(tp, ()))
        return {
            "committed": self._committed_offset.get(tp),
            "acked": len(acked),
            "lowest_acked": acked[:5],
            "read": self._read_offset.get(tp),
            "gaps": [(g.begin, g.end) for g in sorted(self._gap.get(tp) or ())][:5],
        }

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - exercised by the worker tests
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag

        direct_topics = getattr(self.app, "direct_topics", frozenset())
        direct_handler = getattr(self.app, "direct_handler", None)

        async def deliver(batch: list) -> None:
            direct = []
            for tp, message in batch:
                if message.topic in direct_topics:
                    direct.append(message)
                else:
                    await callback(message)
                set_read_offset(tp, message.offset)
            if direct:
                await direct_handler(direct)

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                batch = []
                previous: dict = {}  # last offset taken per partition in this batch
                async for tp, message in getmany(timeout=1.0):
                    offset = message.offset
                    read_offset = previous.get(tp)
                    if read_offset is None:
                        read_offset = get_read_offset(tp)
                    if read_offset is None or offset >= read_offset:
                        # A real gap in the log (Faust treats its offsets as acked),
                        # not merely the next message of this batch.
                        if read_offset and offset - read_offset > 1 and acks_enabled_for(message.topic):
                            await self._add_gap(tp, read_offset + 1, offset)
                        batch.append((tp, message))
                        previous[tp] = offset
                unset_flag(CONSUMER_FETCHING)
                commit_every = self._commit_every
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                if batch:
                    await self.wait_first(deliver(batch), self.suspend_flow.wait())
                else:
                    await self.sleep(0)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
