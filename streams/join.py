"""The join: impressions, clicks and rank logs in, training samples out,
cut into tumbling event-time windows. Pure: no Kafka, files or clocks; the
worker (``streams/app.py``) passes in raw messages, the wall time and a
mutable mapping that a Faust table keeps durable.

State is one JSON-ready dict per request (``request_id`` -> state), so
that every event's effect, and the event ID that deduplicates it, is one
changelog message: a restarted worker never holds half an event.

Rules (see docs/streams.md):

- A click joins its impression by ``(request_id, item_id)`` when
  ``impression.ts <= click.ts <= impression.ts + join_window``. A click
  that comes before its impression waits; when the watermark passes
  ``click.ts + join_window`` with no impression it is dead-lettered as an
  orphan.
- The same ``event_id`` counts once; a second click on the same
  (request, item) pair counts once too.
- A joined click is a label-1 sample at the click's time, in the click's
  window. Shown-but-not-clicked items become label-0 samples (impression
  time) when the join window expires: in the window holding
  ``impression.ts + join_window``, the moment their label is known.
- Items a ranking stage dropped (``kept == false``) become the request's
  hard negatives; a ranking score becomes the item's teacher score (the
  last stage that scored the item wins).
- A record whose window is already closed goes to the first open window
  and counts as late. A window closes when the watermark passes its end
  plus the allowed lateness; the watermark is the smallest, over the input
  partitions still being read, of each one's robust event time
  (``streams/watermark.py``: a high quantile of its recent events, which a
  minority of out-of-order events cannot move).
- An event more than ``max_future`` ahead of its topic partition's stream
  (beyond its bulk and beyond its pace, ``streams/watermark.py``) is
  dead-lettered (``future_timestamp``, "ahead of the stream"); an
  impression or rank log more than ``max_lateness`` behind the watermark
  is dead-lettered (``behind_watermark``): its clicks may have expired as
  orphans already, and joining it would write their items as not clicked.
- A request is deleted after the window holding its label-0 samples is
  closed *and* the offsets of its events are committed (``finalize``), so
  a replay after a crash can never re-create it.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from sys import intern
from typing import Mapping, MutableMapping

from freshtower.streams.events import CLICK, IMPRESSION, RANK_LOG, Click, Impression, InvalidEvent, Limits, RankLog, parse_event
from freshtower.streams.dedup import JoinedIds
from freshtower.streams.placement import Placement
from freshtower.streams.watermark import SourceClock
from freshtower.streams.windows import assign_window, open_from_after

from freshtower.core.batches import Sample


@dataclass(frozen=True)
class JoinSettings:
    window_ms: int = 60_000
    lateness_ms: int = 10_000
    join_window_ms: int = 1_800_000
    max_future_ms: int = 300_000
    limits: Limits = Limits()
    watermark_quantile: float = 0.9
    watermark_sample: int = 64
    max_lateness_ms: int | None = None  # None: half the join window
    dedup_horizon_ms: int = 86_400_000
    partitions: int | None = None  # input partition count: events not on murmur2(user_id)'s are dead-lettered; None: not checked
    # (input topic, its repartition topic): events on the wrong partition of
    # such an input are rerouted (the shell forwards them to the repartition
    # topic), not dead-lettered. Events that arrive through a repartition
    # topic are never rerouted again.
    repartition: tuple[tuple[str, str], ...] = ()

    @cached_property
    def reroute_topics(self) -> frozenset[str]:
        return frozenset(topic for topic, _ in self.repartition)

    @cached_property
    def repartition_of(self) -> dict[str, str]:
        return dict(self.repartition)

    @property
    def effective_max_lateness_ms(self) -> int:
        return self.join_window_ms // 2 if self.max_lateness_ms is None else self.max_lateness_ms

    @classmethod
    def from_config(cls, streams, repartition: Mapping[str, str] | None = None) -> "JoinSettings":
        """From ``freshtower.core.settings.StreamsConfig`` (seconds -> ms);
        ``repartition``: input topic -> its repartition topic (used when
        ``streams.repartition`` is on)."""
        if streams.window_seconds != int(streams.window_seconds):
            raise ValueError(
                f"streams.window_seconds must be whole seconds (batch files are named by second), got {streams.window_seconds}"
            )
        join_window_ms = int(round(streams.join_window_seconds * 1000))
        max_lateness_ms = None if streams.max_lateness_seconds is None else int(round(streams.max_lateness_seconds * 1000))
        if max_lateness_ms is not None and max_lateness_ms >= join_window_ms:
            raise ValueError(
                f"streams.max_lateness_seconds ({streams.max_lateness_seconds}) must be below streams.join_window_seconds "
                f"({streams.join_window_seconds}): a later impression's clicks may have expired as orphans already"
            )
        return cls(
            window_ms=int(round(streams.window_seconds * 1000)),
            lateness_ms=int(round(streams.allowed_lateness_seconds * 1000)),
            join_window_ms=join_window_ms,
            max_future_ms=int(round(streams.max_future_seconds * 1000)),
            watermark_quantile=streams.watermark_quantile,
            watermark_sample=streams.watermark_sample,
            max_lateness_ms=max_lateness_ms,
            dedup_horizon_ms=int(round(streams.dedup_horizon_seconds * 1000)),
            partitions=streams.partitions if streams.check_partitioner else None,
            repartition=tuple(sorted((repartition or {}).items())) if streams.check_partitioner and streams.repartition else (),
            limits=Limits(
                max_event_bytes=streams.max_event_bytes,
                max_id_length=streams.max_id_length,
                max_items=streams.max_items_per_event,
            ),
        )


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One Kafka message as it arrived (Faust's messages have the same
    attributes and are passed as they are)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


# Topic -> event kind with the default topic names (the worker passes its own).
DEFAULT_KINDS = {"impressions": IMPRESSION, "clicks": CLICK, "rank-logs": RANK_LOG}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    code: str  # stable reason code (metric label)
    reason: str  # what and where, for people
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class ClosedWindow:
    start_ms: int
    end_ms: int
    samples: list[Sample]
    late_records: int
    # (request_id, state) of the requests whose label-0 window this is: their
    # whole story is known now (``streams/ranking_samples.py`` reads it)
    requests: list[tuple[str, dict]] = field(default_factory=list)

    @property
    def clicked_item_ids(self) -> list[str]:
        """Clicked items in the order the batch file stores them (and the
        frequency estimator must see them)."""
        clicked = sorted((s for s in self.samples if s.label == 1), key=lambda s: (s.event_time_ms, s.request_id, s.item_id))
        return [s.item_id for s in clicked]


@dataclass
class StepResult:
    dead_letters: list[DeadLetter] = field(default_factory=list)
    closed: list[ClosedWindow] = field(default_factory=list)
    # open_from before and after this step: every window starting in
    # [closed_from, closed_to) closed now, with or without records.
    closed_from_ms: int | None = None
    closed_to_ms: int | None = None
    # (message, partition murmur2 gives): events that arrived on another
    # partition, for the shell to forward through the repartition topic
    rerouted: list[tuple[object, int]] = field(default_factory=list)


class JoinCore:
    """The join over a ``requests`` mapping (request_id -> state dict).

    ``process`` takes a micro-batch of raw messages; ``advance`` moves the
    watermark without events (idle sources); ``finalize`` deletes requests
    whose label-0 window closed, once the caller has committed offsets.
    Changed keys collect in ``dirty`` / ``deleted`` (request_id ->
    partition) for the caller to write to the changelog.
    """

    def __init__(
        self,
        settings: JoinSettings,
        requests: MutableMapping[str, dict],
        progress: dict | None = None,
        kinds: Mapping[str, str] = DEFAULT_KINDS,
        partition: int | None = None,
    ):
        self.settings = settings
        self.requests = requests
        self.kinds = dict(kinds)  # topic -> events.IMPRESSION, CLICK or RANK_LOG
        # The one input partition this core joins (``streams/partitions.py``);
        # ``requests`` may then hold other partitions' states, which it leaves alone.
        self.partition = partition
        progress = progress or {}
        self.open_from_ms: int | None = progress.get("open_from_ms")
        self.watermark_ms: int | None = progress.get("watermark_ms")
        # The clock of each input topic partition (topic, partition): the
        # watermark is the minimum of their times, so a partition read ahead
        # of the others cannot close windows the others still feed.
        self.clocks: dict[tuple[str, int], SourceClock] = {}
        # Event IDs of requests already written out (streams/dedup.py).
        self.placement = None if settings.partitions is None else Placement(settings.partitions)
        self.joined_ids = JoinedIds(settings.dedup_horizon_ms, settings.join_window_ms + settings.window_ms + settings.lateness_ms)
        self.counters: Counter[str] = Counter()
        self.dirty: dict[str, int] = {}
        self.deleted: dict[str, int] = {}
        self._window_requests: dict[int, set[str]] = {}
        self._expiry: list[tuple[int, str]] = []  # (deadline ms, request_id) for requests without impression
        self._finalizable: list[str] = []
        self._features: dict[tuple, dict] = {}
        self.rebuild()

    # --- recovery -------------------------------------------------------------

    def rebuild(self) -> None:
        """Rebuild the in-memory indexes from ``requests`` (after recovery)."""
        self._window_requests.clear()
        self._expiry.clear()
        self._finalizable.clear()
        # The latest event time in the recovered state: every such event was read, so once every
        # source is idle with nothing new to read (a restart after the last event), the watermark
        # starts there instead of waiting for an event that may never come.
        self.recovered_time_ms = None
        for request_id, state in self.requests.items():
            if state is None or (self.partition is not None and state["partition"] != self.partition):
                continue
            latest = _state_time(state)
            if self.recovered_time_ms is None or latest > self.recovered_time_ms:
                self.recovered_time_ms = latest
            if state["impression"] is None:
                self._push_expiry(request_id, state)
                continue
            if self._is_finalized(state):
                self._finalizable.append(request_id)
                continue
            for _, _, window, _ in state["clicks"].values():
                # Clicks in windows before open_from are in batch files already.
                if self.open_from_ms is None or window >= self.open_from_ms:
                    self._window_requests.setdefault(window, set()).add(request_id)
            self._window_requests.setdefault(state["label0_window"], set()).add(request_id)

    @property
    def partition_time(self) -> dict[tuple[str, int], int]:
        """Each input topic partition's robust event time."""
        return {source: clock.time for source, clock in self.clocks.items() if clock.time is not None}

    def progress(self) -> dict:
        return {"open_from_ms": self.open_from_ms, "watermark_ms": self.watermark_ms}

    @property
    def open_requests(self) -> int:
        if self.partition is None:
            return len(self.requests)
        return sum(1 for state in self.requests.values() if state["partition"] == self.partition)

    # --- the stream -------------------------------------------------------------

    def process(
        self, messages, now_ms: int, partitions: set[tuple[str, int]] | None = None, idle: set[tuple[str, int]] = frozenset()
    ) -> StepResult:
        """Apply a micro-batch of messages (``RawEvent`` or Faust's: topic,
        partition, offset, key, value) in order; then move the watermark,
        close the windows it has passed and expire waiting clicks.

        ``partitions``: the input partitions (topic, partition) this worker
        reads (default: those seen so far); ``idle``: those read to their
        end, which do not hold the watermark back.
        """
        result = StepResult()
        dead = result.dead_letters
        limits = self.settings.limits
        counters = self.counters
        clocks = self.clocks
        kinds = self.kinds
        seen = Counter()
        s = self.settings
        # Two passes: validate the batch first, so that each topic partition's
        # "ahead of the stream" bound can take this batch's own events into account.
        valid = []
        batch_times: dict[tuple[str, int], list[int]] = {}
        for message in messages:
            kind = kinds[message.topic]
            seen[kind] += 1
            try:
                event = parse_event(kind, message.key, message.value, limits)
            except InvalidEvent as error:
                self._dead_letter(dead, error, message)
                continue
            valid.append((message, kind, event))
            times = batch_times.get((message.topic, message.partition))
            if times is None:
                times = batch_times[message.topic, message.partition] = []
            times.append(event.ts)
        bounds = {}
        for source, times in batch_times.items():
            clock = clocks.get(source)
            if clock is None:
                clock = clocks[source] = SourceClock(s.watermark_quantile, s.watermark_sample)
            bounds[source] = clock.ahead_bound(times, now_ms, s.max_future_ms)
        # The watermark moves only after the batch, so one lateness bound serves it all.
        late_before = None if self.watermark_ms is None else self.watermark_ms - s.effective_max_lateness_ms
        joined_ids = self.joined_ids
        written_out = joined_ids.seen_many([event.event_id for _, _, event in valid])
        for (message, kind, event), copy in zip(valid, written_out):
            source = (message.topic, message.partition)
            try:
                # "Ahead of the stream" is judged on the stream the event arrived on, so a rerouted
                # event is judged before it leaves, not again on its (sparse) repartition topic.
                forwarded = s.reroute_topics and message.topic not in s.reroute_topics
                if not forwarded and event.ts > bounds[source] and event.ts > clocks[source].pace_bound(now_ms, s.max_future_ms):
                    self._reject_future(event.ts, clocks[source], bounds[source], now_ms)
                if self.placement is not None and (target := self.placement.partition(message.key)) != message.partition:
                    if message.topic in s.reroute_topics:
                        result.rerouted.append((message, target))
                        counters["rerouted." + kind] += 1
                        seen[kind] -= 1  # counted in where it is joined
                        clocks[source].add(event.ts)  # it tells how far this topic partition has been read
                        continue
                    raise InvalidEvent("wrong_partitioner", self.placement.reason(message.key, message.partition))
                if copy:  # its request was written out already: a copy, whatever partition, however late
                    counters["duplicates." + kind] += 1
                    continue
                if joined_ids.too_late(event.ts, self.watermark_ms):
                    self._reject_too_late(event.ts)
                if kind == CLICK:
                    self._on_click(event, message, dead)
                elif kind == IMPRESSION:
                    self._on_impression(event, message.partition, dead, late_before)
                else:
                    self._on_rank_log(event, message.partition, late_before)
            except InvalidEvent as error:
                self._dead_letter(dead, error, message)
                continue
            # Valid events (duplicates included) feed their partition's clock.
            clocks[source].add(event.ts)
        for source in batch_times:
            clocks[source].settle()
        for kind, n in seen.items():
            counters["events_in." + kind] += n
        self._update_watermark(partitions, idle)
        self._after_time_moved(result)
        return result

    def _update_watermark(self, partitions: set[tuple[str, int]] | None, idle: set[tuple[str, int]]) -> None:
        """Watermark = min over active partitions of their largest event
        time; partitions read to their end are left out (when all are, the
        max over all: nothing is pending anywhere). Never moves back."""
        times = self.partition_time
        if not times:
            if self.recovered_time_ms is not None and partitions and partitions <= idle and self.watermark_ms is None:
                self.watermark_ms = self.recovered_time_ms
            return
        partitions = set(times) if partitions is None else partitions
        active = partitions - idle
        if active:
            if any(p not in times for p in active):
                return  # a partition with unread events whose time is unknown
            candidate = min(times[p] for p in active)
        else:
            candidate = max(times[p] for p in partitions if p in times) if partitions & times.keys() else None
        if candidate is not None and (self.watermark_ms is None or candidate > self.watermark_ms):
            self.watermark_ms = candidate

    def advance(self, watermark_ms: int) -> StepResult:
        """Move the watermark forward without events (idle sources)."""
        result = StepResult()
        if self.watermark_ms is None or watermark_ms > self.watermark_ms:
            self.watermark_ms = watermark_ms
            self._after_time_moved(result)
        return result

    def finalize(self) -> int:
        """Delete requests whose label-0 window has closed. Call only after
        the offsets of every event processed so far are committed."""
        done = 0
        for request_id in self._finalizable:
            state = self.requests.get(request_id)
            if state is not None and self._is_finalized(state):
                self.joined_ids.add(_event_ids(request_id, state), state["impression"]["ts"], state["partition"])
                del self.requests[request_id]
                self.dirty.pop(request_id, None)
                self.deleted[request_id] = state["partition"]
                done += 1
        self._finalizable.clear()
        return done

    @property
    def pending_finalization(self) -> int:
        return len(self._finalizable)

    # --- events -----------------------------------------------------------------

    def _dead_letter(self, dead: list, error: InvalidEvent, message) -> None:
        dead.append(DeadLetter(error.code, error.message, message.topic, message.partition, message.offset, message.key, message.value))
        self.counters["dead_letters." + error.code] += 1

    def _reject_future(self, ts: int, clock: SourceClock, bound: int, now_ms: int) -> None:
        if ts > now_ms + self.settings.max_future_ms:
            where = f"ahead of the wall clock {now_ms}"
        else:
            pace = clock.pace_bound(now_ms, self.settings.max_future_ms)
            where = (
                f"ahead of the stream: the bulk of its topic partition's recent events is at {clock.bulk_ms}, bound {bound}; "
                f"past their pace too (bound {pace})"
            )
        raise InvalidEvent(
            "future_timestamp",
            f"ts {ts} is {where} (streams.max_future_seconds = {self.settings.max_future_ms / 1000:,.0f} s)",
        )

    def _reject_too_late(self, ts: int) -> None:
        horizon = self.settings.dedup_horizon_ms
        raise InvalidEvent(
            "too_late",
            f"ts {ts} is {(self.watermark_ms - ts) / 1000:,.0f} s behind the watermark {self.watermark_ms}, past the dedup horizon "
            f"(streams.dedup_horizon_seconds = {horizon / 1000:,.0f} s after its request was written out): "
            f"a copy of an event written out then can no longer be recognised",
        )

    def _reject_late(self, kind: str, event_id: str, ts: int) -> None:
        raise InvalidEvent(
            "behind_watermark",
            f"{kind} {event_id!r}: ts {ts} is {(self.watermark_ms - ts) / 1000:,.0f} s behind the watermark {self.watermark_ms} "
            f"(limit streams.max_lateness_seconds = {self.settings.effective_max_lateness_ms / 1000:,.0f} s): "
            f"its clicks may have expired already",
        )

    def _new_state(self, user_id: str, partition: int) -> dict:
        return {
            "user": user_id,
            "partition": partition,
            "impression": None,
            "label0_window": None,
            "label0_late": False,
            "clicks": {},  # item_id -> [ts, event_id, window, late]
            "pending_clicks": [],  # [event_id, item_id, ts, offset, topic, partition, raw value]
            "ignored_event_ids": [],  # repeat clicks on an already clicked pair
            "rank": None,  # {"ts", "stages", "hard", "scores"}
        }

    def _shared_features(self, features: dict) -> dict:
        """One dict per distinct set of item features: items of a catalogue
        repeat them across thousands of open requests (~30% of the join
        state's memory otherwise). Shared dicts are never mutated."""
        key = tuple(features.items())
        shared = self._features.get(key)
        if shared is None:
            if len(self._features) >= 100_000:
                self._features.clear()
            shared = self._features[key] = features
        return shared

    def _is_finalized(self, state: dict) -> bool:
        window = state["label0_window"]
        return window is not None and self.open_from_ms is not None and window < self.open_from_ms

    def _on_impression(self, event: Impression, partition: int, dead: list, late_before: int | None = None) -> None:
        request_id = event.request_id
        state = self.requests.get(request_id)
        late = late_before is not None and event.ts < late_before
        if state is None:
            if late:
                self._reject_late("impression", event.event_id, event.ts)
            state = self._new_state(event.user_id, partition)
            self.requests[request_id] = state
        elif state["partition"] != partition:
            _partition_mismatch("impression", event.event_id, request_id, state, partition)
        elif state["impression"] is not None:
            if state["impression"]["event_id"] == event.event_id:
                self.counters["duplicates.impression"] += 1
                return
            raise InvalidEvent(
                "conflicting_impression",
                f"impression {event.event_id!r}: request {request_id!r} already has impression {state['impression']['event_id']!r}",
            )
        elif late:
            self._reject_late("impression", event.event_id, event.ts)
        if state["user"] != event.user_id:
            raise InvalidEvent(
                "user_mismatch",
                f"impression {event.event_id!r}: user {event.user_id!r}, but request {request_id!r} belongs to {state['user']!r}",
            )
        s = self.settings
        state["impression"] = {
            "event_id": event.event_id,
            "ts": event.ts,
            "items": {intern(i.item_id): [i.position, self._shared_features(i.features)] for i in event.items},  # in slot order
            "user_categorical": event.user_features.categorical,
            "user_numeric": event.user_features.numeric,
        }
        window, late = assign_window(event.ts + s.join_window_ms, s.window_ms, self.open_from_ms)
        state["label0_window"] = window
        state["label0_late"] = late
        self._window_requests.setdefault(window, set()).add(request_id)
        self.dirty[request_id] = state["partition"]
        pending, state["pending_clicks"] = state["pending_clicks"], []
        for event_id, item_id, ts, offset, topic, click_partition, raw in pending:
            try:
                self._join(state, request_id, event_id, state["user"], item_id, ts)
            except InvalidEvent as error:
                dead.append(DeadLetter(error.code, error.message, topic, click_partition, offset, state["user"].encode(), raw.encode()))
                self.counters["dead_letters." + error.code] += 1

    def _on_click(self, event: Click, raw, dead: list) -> None:
        request_id = event.request_id
        state = self.requests.get(request_id)
        if state is None:
            state = self._new_state(event.user_id, raw.partition)
            self.requests[request_id] = state
        elif state["partition"] != raw.partition:
            _partition_mismatch("click", event.event_id, request_id, state, raw.partition)
        elif self._seen_click(state, event.event_id):
            self.counters["duplicates.click"] += 1
            return
        if state["impression"] is None:
            if state["user"] != event.user_id:
                raise InvalidEvent(
                    "user_mismatch",
                    f"click {event.event_id!r}: user {event.user_id!r}, but request {request_id!r} belongs to {state['user']!r}",
                )
            # Waits for its impression; the raw value is kept for the dead letter.
            state["pending_clicks"].append(
                [event.event_id, event.item_id, event.ts, raw.offset, raw.topic, raw.partition, raw.value.decode()]
            )
            self.counters["clicks_waiting"] += 1
            heapq.heappush(self._expiry, (event.ts + self.settings.join_window_ms, request_id))
            self.dirty[request_id] = state["partition"]
            return
        self._join(state, request_id, event.event_id, event.user_id, event.item_id, event.ts)

    def _seen_click(self, state: dict, event_id: str) -> bool:
        if event_id in state["ignored_event_ids"]:
            return True
        for click in state["clicks"].values():
            if click[1] == event_id:
                return True
        for pending in state["pending_clicks"]:
            if pending[0] == event_id:
                return True
        return False

    def _join(self, state: dict, request_id: str, event_id: str, user_id: str, item_id: str, ts: int) -> None:
        """Join a click to the impression in ``state`` (raises on a misfit)."""
        impression = state["impression"]
        if self._is_finalized(state):
            raise InvalidEvent(
                "click_after_finalization", f"click {event_id!r}: request {request_id!r} was already written out (its join window closed)"
            )
        if user_id != state["user"]:
            raise InvalidEvent(
                "user_mismatch", f"click {event_id!r}: user {user_id!r}, but request {request_id!r} belongs to {state['user']!r}"
            )
        delay = ts - impression["ts"]
        if not 0 <= delay <= self.settings.join_window_ms:
            raise InvalidEvent(
                "click_outside_join_window",
                f"click {event_id!r}: {delay / 1000:,.1f} s after its impression "
                f"(join window {self.settings.join_window_ms / 1000:,.0f} s)",
            )
        if item_id not in impression["items"]:
            raise InvalidEvent("click_item_not_shown", f"click {event_id!r}: item {item_id!r} was not shown in request {request_id!r}")
        clicks = state["clicks"]
        if item_id in clicks:
            state["ignored_event_ids"].append(event_id)
            self.counters["duplicates.click_pair"] += 1
        else:
            window, late = assign_window(ts, self.settings.window_ms, self.open_from_ms)
            clicks[item_id] = [ts, event_id, window, late]
            self._window_requests.setdefault(window, set()).add(request_id)
            self.counters["joined_clicks"] += 1
        self.dirty[request_id] = state["partition"]

    def _on_rank_log(self, event: RankLog, partition: int, late_before: int | None = None) -> None:
        request_id = event.request_id
        state = self.requests.get(request_id)
        late = late_before is not None and event.ts < late_before
        if state is None:
            if late:
                self._reject_late("rank log", event.event_id, event.ts)
            state = self._new_state(event.user_id, partition)
            self.requests[request_id] = state
        elif state["partition"] != partition:
            _partition_mismatch("rank log", event.event_id, request_id, state, partition)
        if state["user"] != event.user_id:
            raise InvalidEvent(
                "user_mismatch",
                f"rank log {event.event_id!r}: user {event.user_id!r}, but request {request_id!r} belongs to {state['user']!r}",
            )
        rank = state["rank"]
        if rank is not None and event.stage in rank["stages"]:
            self.counters["duplicates.rank_log"] += 1
            return
        if late:
            self._reject_late("rank log", event.event_id, event.ts)
        if rank is None:
            rank = state["rank"] = {"ts": event.ts, "stages": [], "hard": [], "scores": {}}
        if self._is_finalized(state):
            self.counters["rank_logs_after_finalization"] += 1
            return
        rank["stages"].append(event.stage)
        item_ids, kept = event.item_ids, event.kept
        rank.setdefault("lists", {})[event.stage] = [list(item_ids), list(event.scores), list(kept)]  # ranking samples
        # Teacher scores matter only for items that go on (only shown items
        # become samples); the last stage to score an item wins.
        rank["scores"].update([(i, score) for i, score, k in zip(item_ids, event.scores, kept) if k])
        dropped = [i for i, k in zip(item_ids, kept) if not k]
        hard = rank["hard"]
        hard.extend([item_id for item_id in dropped if item_id not in hard] if hard else dropped)
        if state["impression"] is None:
            heapq.heappush(self._expiry, (rank["ts"] + self.settings.join_window_ms, request_id))
        self.dirty[request_id] = state["partition"]

    # --- time -------------------------------------------------------------------

    def _push_expiry(self, request_id: str, state: dict) -> None:
        deadline = self._expiry_deadline(state)
        if deadline is not None:
            heapq.heappush(self._expiry, (deadline, request_id))

    def _expiry_deadline(self, state: dict) -> int | None:
        times = [p[2] for p in state["pending_clicks"]]
        if state["rank"] is not None:
            times.append(state["rank"]["ts"])
        return min(times) + self.settings.join_window_ms if times else None

    def _after_time_moved(self, result: StepResult) -> None:
        if self.watermark_ms is None:
            return
        self._expire_waiting(result.dead_letters)
        self.joined_ids.expire(self.watermark_ms)
        s = self.settings
        target = open_from_after(self.watermark_ms, s.window_ms, s.lateness_ms)
        if self.open_from_ms is not None and target <= self.open_from_ms:
            return
        result.closed_from_ms = self.open_from_ms
        result.closed_to_ms = target
        for window in sorted(w for w in self._window_requests if w < target):
            result.closed.append(self._close(window))
        self.open_from_ms = target

    def _expire_waiting(self, dead: list) -> None:
        """Dead-letter clicks whose impression never came; drop rank logs
        that never met their impression."""
        watermark = self.watermark_ms
        join_window = self.settings.join_window_ms
        while self._expiry and self._expiry[0][0] <= watermark:
            _, request_id = heapq.heappop(self._expiry)
            state = self.requests.get(request_id)
            if state is None or state["impression"] is not None:
                continue  # joined meanwhile, or already expired
            keep = []
            for pending in state["pending_clicks"]:
                event_id, item_id, ts, offset, topic, partition, raw = pending
                if ts + join_window <= watermark:
                    reason = f"click {event_id!r}: no impression for request {request_id!r} within {join_window / 1000:,.0f} s"
                    dead.append(DeadLetter("orphan_click", reason, topic, partition, offset, state["user"].encode(), raw.encode()))
                    self.counters["dead_letters.orphan_click"] += 1
                else:
                    keep.append(pending)
            state["pending_clicks"] = keep
            rank_waiting = state["rank"] is not None and state["rank"]["ts"] + join_window > watermark
            if keep or rank_waiting:
                # The next deadline among what still waits (a rank log that
                # expired already must not bring it back to now: that looped).
                times = [p[2] for p in keep] + ([state["rank"]["ts"]] if rank_waiting else [])
                heapq.heappush(self._expiry, (min(times) + join_window, request_id))
                self.dirty[request_id] = state["partition"]
            else:
                if state["rank"] is not None:
                    self.counters["orphan_rank_logs"] += 1
                del self.requests[request_id]
                self.dirty.pop(request_id, None)
                self.deleted[request_id] = state["partition"]

    def _close(self, window: int) -> ClosedWindow:
        samples: list[Sample] = []
        finished: list[tuple[str, dict]] = []
        late = 0
        for request_id in sorted(self._window_requests.pop(window)):
            state = self.requests[request_id]
            impression = state["impression"]
            items = impression["items"]
            rank = state["rank"]
            hard = tuple(rank["hard"]) if rank else ()
            scores = rank["scores"] if rank else {}
            user = state["user"]
            user_categorical = impression["user_categorical"]
            user_numeric = impression["user_numeric"]
            clicks = state["clicks"]
            for item_id, (ts, _, click_window, click_late) in clicks.items():
                if click_window == window:
                    position, features = items[item_id]
                    samples.append(
                        Sample(
                            user, item_id, 1, ts, request_id, position, user_categorical, user_numeric, features, hard, scores.get(item_id)
                        )
                    )
                    late += bool(click_late)
            if state["label0_window"] == window:
                for item_id, (position, features) in items.items():
                    if item_id not in clicks:
                        samples.append(
                            Sample(
                                user,
                                item_id,
                                0,
                                impression["ts"],
                                request_id,
                                position,
                                user_categorical,
                                user_numeric,
                                features,
                                hard,
                                scores.get(item_id),
                            )
                        )
                        late += bool(state["label0_late"])
                self._finalizable.append(request_id)
                finished.append((request_id, state))
        positives = sum(s.label for s in samples)
        self.counters["records_out.label1"] += positives
        self.counters["records_out.label0"] += len(samples) - positives
        self.counters["late_records"] += late
        self.counters["windows_closed"] += 1
        return ClosedWindow(window, window + self.settings.window_ms, samples, late, finished)


def _event_ids(request_id: str, state: dict) -> list[str]:
    """Every event ID a written-out request's state holds."""
    ids = [state["impression"]["event_id"]]
    ids += [click[1] for click in state["clicks"].values()]
    ids += state["ignored_event_ids"]
    if state["rank"] is not None:
        ids += [f"{request_id}/{stage}" for stage in state["rank"]["stages"]]
    return ids


def _state_time(state: dict) -> int:
    """The latest event time a request's join state holds."""
    times = [c[0] for c in state.get("clicks", {}).values()] + [p[2] for p in state.get("pending_clicks", ())]
    for part in ("impression", "rank"):
        if state.get(part) is not None:
            times.append(state[part]["ts"])
    return max(times, default=0)


def _partition_mismatch(kind: str, event_id: str, request_id: str, state: dict, partition: int):
    """A request's events must share one partition number (producers key
    them by user_id): each partition is joined on its own, possibly by
    another worker, so a request cannot span two."""
    raise InvalidEvent(
        "partition_mismatch",
        f"{kind} {event_id!r} on partition {partition}: request {request_id!r} is on partition {state['partition']} "
        f"(user {state['user']!r}); events must be keyed by user_id",
    )
