from __future__ import annotations

import copy
import itertools
import random

import msgspec
import orjson
import pytest
from freshtower.streams.join import JoinCore, JoinSettings, RawEvent

from freshtower.app.simulator import Simulator, SimulatorConfig
from tests.streams.oracle import T0, assert_samples_match, expected_samples, raw_events

SECOND = 1000
SETTINGS = JoinSettings(window_ms=60 * SECOND, lateness_ms=10 * SECOND, join_window_ms=300 * SECOND, max_future_ms=300 * SECOND)
WORLD = SimulatorConfig(users=300, items=200, topics=8, requests_per_day=1500, seed=5)
# This world is sparse: a topic partition sees ~550 events a day, with quiet
# gaps of up to ~80 minutes at night. Replayed as history, the "ahead of the
# stream" bound must allow for them (streams/watermark.py).
SPARSE = JoinSettings(max_future_ms=3 * 3_600_000)


class Events:
    """Hand-made raw messages with increasing offsets per (topic, partition)."""

    def __init__(self):
        self.offsets = itertools.count()

    def raw(self, topic, event, partition=0, key=None) -> RawEvent:
        value = event if isinstance(event, bytes) else msgspec.json.encode(event)
        key = key if key is not None else (event["user_id"].encode() if isinstance(event, dict) else b"u1")
        return RawEvent(topic, partition, next(self.offsets), key, value)

    def impression(self, ts, request="r1", user="u1", items=("a", "b", "c"), event_id=None, **kw):
        event = {
            "event_id": event_id or f"imp-{request}",
            "request_id": request,
            "user_id": user,
            "ts": ts,
            "items": [{"item_id": i, "position": p, "features": {"category": "c1"}} for p, i in enumerate(items)],
            "user_features": {"categorical": {"city": "x"}, "numeric": {"activity_7d": 0.5}},
        }
        return self.raw("impressions", event, **kw)

    def click(self, ts, item="a", request="r1", user="u1", event_id=None, **kw):
        event = {"event_id": event_id or f"clk-{request}-{item}", "request_id": request, "user_id": user, "item_id": item, "ts": ts}
        return self.raw("clicks", event, **kw)

    def rank(
        self,
        ts,
        request="r1",
        user="u1",
        stage="rank",
        items=("a", "b", "c", "d"),
        scores=(0.9, 0.8, 0.7, 0.1),
        kept=(True, True, True, False),
        **kw,
    ):
        event = {
            "request_id": request,
            "user_id": user,
            "ts": ts,
            "stage": stage,
            "item_ids": list(items),
            "scores": list(scores),
            "kept": list(kept),
        }
        return self.raw("rank-logs", event, **kw)


def run(core: JoinCore, batches, now_ms=T0):
    """Process batches, each one all there is (every partition read to its
    end, so the watermark is the largest event time); return (samples by
    window, dead letters)."""
    windows, dead = {}, []
    for batch in batches:
        seen = core.partition_time.keys() | {(e.topic, e.partition) for e in batch}
        result = core.process(batch, now_ms, partitions=seen, idle=seen)
        dead += result.dead_letters
        for w in result.closed:
            windows.setdefault(w.start_ms, []).extend(w.samples)
        core.finalize()
    return windows, dead


def flush(core: JoinCore, windows: dict, to_ms: int) -> list:
    result = core.advance(to_ms)
    for w in result.closed:
        windows.setdefault(w.start_ms, []).extend(w.samples)
    core.finalize()
    return result.dead_letters


def all_samples(windows: dict) -> list:
    return [s for samples in windows.values() for s in samples]


# --- against the simulator ---------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    simulator = Simulator(WORLD)
    return simulator, raw_events(simulator, [0]), expected_samples(simulator, [0])


@pytest.mark.parametrize("window_ms", [60_000, 5_000])
def test_a_replayed_day_joins_exactly_into_the_simulators_samples(world, window_ms):
    simulator, events, expected = world
    core = JoinCore(JoinSettings(window_ms=window_ms), {})  # 30-minute join window
    windows, dead = run(core, [events[i : i + 500] for i in range(0, len(events), 500)], now_ms=T0 + 10 * 86_400_000)
    dead += flush(core, windows, core.watermark_ms + 3_600_000)
    assert not dead
    assert_samples_match(all_samples(windows), expected)
    assert core.counters["late_records"] == 0
    assert core.open_requests == 0  # everything finalized
    # Clicked samples sit in the window of their click time, the others in
    # the window where their join window expired.
    for start, samples in windows.items():
        for s in samples:
            decided_at = s.event_time_ms if s.label else s.event_time_ms + 1_800_000
            assert start <= decided_at < start + window_ms


def test_partitions_read_unevenly_still_join_exactly_and_on_time(world):
    simulator, events, expected = world
    queues = {}
    for e in events:
        queues.setdefault((e.topic, e.partition), []).append(e)
    rng = random.Random(3)
    order = []
    while queues:  # chunks of up to 400 events from a random partition: some run hours ahead
        tp = rng.choice(sorted(queues))
        take = rng.randint(1, 400)
        order += queues[tp][:take]
        del queues[tp][:take]
        if not queues[tp]:
            del queues[tp]
    partitions = {(e.topic, e.partition) for e in events}
    core = JoinCore(JoinSettings(), {})
    windows, dead = {}, []
    for i in range(0, len(order), 300):
        result = core.process(order[i : i + 300], T0 + 10 * 86_400_000, partitions=partitions)
        dead += result.dead_letters
        for w in result.closed:
            windows.setdefault(w.start_ms, []).extend(w.samples)
        core.finalize()
    dead += flush(core, windows, core.watermark_ms + 3_600_000)
    assert not dead
    assert_samples_match(all_samples(windows), expected)
    assert core.counters["late_records"] == 0
    assert core.counters["clicks_waiting"] > 0  # some clicks did arrive before their impression


# --- the rules, one at a time --------------------------------------------------------


def test_a_click_before_its_impression_waits_and_joins():
    ev = Events()
    core = JoinCore(SETTINGS, {})
    windows, dead = run(core, [[ev.click(T0 + 5 * SECOND)], [ev.impression(T0), ev.rank(T0 - 50)]])
    dead += flush(core, windows, T0 + 3_600_000)
    assert not dead
    labels = {(s.item_id, s.label) for s in all_samples(windows)}
    assert labels == {("a", 1), ("b", 0), ("c", 0)}  # 3 shown, "a" clicked
    clicked = next(s for s in all_samples(windows) if s.label == 1)
    assert clicked.event_time_ms == T0 + 5 * SECOND
    assert clicked.hard_negative_ids == ("d",) and clicked.teacher_score == 0.9


def test_a_click_without_impression_is_dead_lettered_as_an_orphan_after_the_join_window():
    ev = Events()
    core = JoinCore(SETTINGS, {})
    orphan = ev.click(T0, request="lost")
    result = core.process([orphan, ev.impression(T0 + 1, request="other")], T0)
    assert not result.dead_letters  # still waiting
    result = core.advance(T0 + 299 * SECOND)
    assert not result.dead_letters  # 299 s < 300 s join window
    result = core.advance(T0 + 300 * SECOND)
    [letter] = result.dead_letters
    assert letter.code == "orphan_click"
    assert (letter.topic, letter.partition, letter.offset, letter.key, letter.value) == (
        orphan.topic,
        orphan.partition,
        orphan.offset,
        orphan.key,
        orphan.value,
    )
    assert "lost" not in core.requests  # the waiting state is gone


def test_duplicate_events_count_once():
    ev = Events()
    core = JoinCore(SETTINGS, {})
    batch = [ev.rank(T0 - 50), ev.impression(T0), ev.click(T0 + SECOND)]
    again = [ev.rank(T0 - 50), ev.impression(T0), ev.click(T0 + SECOND), ev.click(T0 + 2 * SECOND, event_id="another-click-on-a")]
    windows, dead = run(core, [batch, again])
    dead += flush(core, windows, T0 + 3_600_000)
    assert not dead
    assert sorted((s.item_id, s.label) for s in all_samples(windows)) == [("a", 1), ("b", 0), ("c", 0)]
    c = core.counters
    assert (c["duplicates.impression"], c["duplicates.click"], c["duplicates.rank_log"], c["duplicates.click_pair"]) == (1, 1, 1, 1)


def test_shown_not_clicked_items_become_label_0_when_the_join_window_expires():
    ev = Events()
    core = JoinCore(SETTINGS, {})
    windows, _ = run(core, [[ev.impression(T0 + 30 * SECOND)]])
    # expiry at 30 s + 300 s = 330 s, in window [300 s, 360 s), which closes at 370 s
    assert not flush(core, windows, T0 + 369 * SECOND) and not windows
    flush(core, windows, T0 + 370 * SECOND)
    assert list(windows) == [T0 + 300 * SECOND]
    assert {(s.item_id, s.label, s.event_time_ms) for s in windows[T0 + 300 * SECOND]} == {(i, 0, T0 + 30 * SECOND) for i in "abc"}


def test_a_window_closes_once_the_watermark_passes_its_end_plus_lateness():
    ev = Events()
    core = JoinCore(SETTINGS, {})
    windows, _ = run(core, [[ev.impression(T0), ev.click(T0 + 10 * SECOND)], [ev.impression(T0 + 69 * SECOND, request="r2")]])
    assert not windows  # watermark 69 s < 60 s + 10 s
    windows, _ = run(core, [[ev.impression(T0 + 70 * SECOND, request="r3")]])
    assert list(windows) == [T0] and [(s.item_id, s.label) for s in windows[T0]] == [("a", 1)]


def test_a_late_click_goes_to_the_first_open_window_and_counts_as_late():
    ev = Events()
    core = JoinCore(SETTINGS, {})
    windows, _ = run(core, [[ev.impression(T0)], [ev.impression(T0 + 130 * SECOND, request="r2")]])  # closes [0, 60) and [60, 120)
    assert core.open_from_ms == T0 + 120 * SECOND
    late_windows, _ = run(core, [[ev.click(T0 + 20 * SECOND)]])  # its own window closed long ago
    flush(core, late_windows, T0 + 190 * SECOND)
    [late] = [s for s in all_samples(late_windows) if s.label == 1]
    assert late.event_time_ms == T0 + 20 * SECOND and late.item_id == "a"
    assert T0 + 120 * SECOND in late_windows and late in late_windows[T0 + 120 * SECOND]
    assert core.counters["late_records"] == 1


def test_events_far_ahead_of_the_watermark_and_clock_are_dead_lettered():
    ev = Events()
    core = JoinCore(SETTINGS, {})
    run(core, [[ev.impression(T0)]])
    future = ev.click(T0 + 301 * SECOND)  # max_future is 300 s
    _, dead = run(core, [[future, ev.click(T0 + 300 * SECOND, item="b")]])
    assert [d.code for d in dead] == ["future_timestamp"] and dead[0].offset == future.offset
    assert core.watermark_ms == T0 + 300 * SECOND  # the rejected event did not move it


@pytest.mark.parametrize(
    "click_ts, item, code",
    [
        (T0 + 301 * SECOND, "a", "click_outside_join_window"),
        (T0 - SECOND, "a", "click_outside_join_window"),
        (T0 + SECOND, "zzz", "click_item_not_shown"),
    ],
)
def test_clicks_that_cannot_join_are_dead_lettered(click_ts, item, code):
    ev = Events()
    core = JoinCore(SETTINGS, {})
    result = core.process([ev.impression(T0), ev.click(click_ts, item=item)], T0 + 3_600_000)
    assert [d.code for d in result.dead_letters] == [code]


def test_a_request_spread_over_two_partitions_is_dead_lettered():
    # Each partition is joined on its own, maybe by another worker: a
    # request's events must share one partition (producers key by user_id).
    ev = Events()
    core = JoinCore(SETTINGS, {})
    result = core.process([ev.impression(T0, partition=0), ev.click(T0 + SECOND, partition=1), ev.rank(T0, partition=2)], T0)
    assert [d.code for d in result.dead_letters] == ["partition_mismatch", "partition_mismatch"]
    assert [d.partition for d in result.dead_letters] == [1, 2] and "on partition 0" in result.dead_letters[0].reason
    assert core.counters["joined_clicks"] == 0


def test_a_core_for_one_partition_leaves_the_others_states_alone():
    ev = Events()
    requests: dict = {}
    JoinCore(SETTINGS, requests).process([ev.impression(T0, request="r0", partition=0), ev.impression(T0, request="r1", partition=1)], T0)
    core = JoinCore(SETTINGS, requests, partition=1)
    assert core.open_requests == 1
    closed = core.advance(T0 + 400 * SECOND).closed
    assert [{s.request_id for s in w.samples} for w in closed] == [{"r1"}]


def test_invalid_events_are_dead_lettered_and_the_batch_goes_on():
    ev = Events()
    core = JoinCore(SETTINGS, {})
    bad = [
        ev.raw("clicks", b"{not json"),
        ev.raw("clicks", {"event_id": "c", "request_id": "r1", "user_id": "u1", "ts": 5}),
        ev.raw("impressions", {"event_id": "i", "request_id": "r9", "user_id": "u1", "ts": "5", "items": []}),
        ev.raw("clicks", {"event_id": "c", "request_id": "r1", "user_id": "u1", "item_id": "a", "ts": -1}),
        ev.raw("clicks", {"event_id": "", "request_id": "r1", "user_id": "u1", "item_id": "a", "ts": 5}),
        ev.raw("clicks", b"{" + b" " * 300_000 + b"}"),
    ]
    good = [ev.impression(T0), ev.click(T0 + SECOND)]
    result = core.process(bad[:3] + good + bad[3:], T0)
    assert [d.code for d in result.dead_letters] == ["invalid_json", "missing_field", "wrong_type", "bad_timestamp", "bad_id", "oversized"]
    assert [d.offset for d in result.dead_letters] == [b.offset for b in bad]
    assert all(d.value == b.value for d, b in zip(result.dead_letters, bad))
    assert core.counters["joined_clicks"] == 1


def test_a_request_is_deleted_only_by_finalize():
    ev = Events()
    core = JoinCore(SETTINGS, {})
    core.process([ev.impression(T0)], T0)
    result = core.advance(T0 + 400 * SECOND)
    assert len(result.closed) == 1 and "r1" in core.requests and core.pending_finalization == 1
    # Replayed before the commit: still a duplicate, never a second set of samples.
    again = core.process([ev.impression(T0)], T0)
    assert not again.closed and core.counters["duplicates.impression"] == 1
    assert core.finalize() == 1 and "r1" not in core.requests and core.deleted == {"r1": 0}


# --- restart: the shell's protocol, crashed at every kind of point --------------------


class Shell:
    """The worker's delivery protocol without Kafka (see streams/app.py):
    changelog messages become durable at commits, offsets are committed at
    commits, closed windows are files at once, requests are finalized and
    progress written right after a commit."""

    def __init__(self, events, changelog=None, committed=0, files=None):
        self.events = events
        self.changelog = changelog if changelog is not None else []  # (partition, key, json) messages
        self.durable = len(self.changelog)
        self.committed = committed  # next event index to read after a restart
        self.files = files if files is not None else {}
        state, progress = {}, {}
        for _, key, value in self.changelog:
            target = progress if key == "@progress" else state
            if value is None:
                target.pop(key, None)
            elif key == "@progress":
                progress = orjson.loads(value)
            else:
                state[key] = orjson.loads(value)
        self.core = JoinCore(SPARSE, state, progress)
        self.stale = {w for w in self.files if self.core.open_from_ms is None or w >= self.core.open_from_ms}
        self.position = committed
        self.pending = False

    def write_changelog(self):
        for key, partition in self.core.dirty.items():
            self.changelog.append((partition, key, orjson.dumps(self.core.requests[key])))
        for key, partition in self.core.deleted.items():
            self.changelog.append((partition, key, None))
        self.core.dirty.clear()
        self.core.deleted.clear()

    def commit(self):
        self.durable = len(self.changelog)  # Faust flushes the producer, then commits offsets
        self.committed = self.position

    def step(self, size):
        if self.pending:
            self.commit()
            self.changelog.append((0, "@progress", orjson.dumps(self.core.progress())))
            self.durable = len(self.changelog)  # the worker flushes the progress ...
            self.core.finalize()  # ... before it deletes anything
            self.write_changelog()
            self.pending = False
        batch = self.events[self.position : self.position + size]
        self.position += len(batch)
        result = self.core.process(batch, T0 + 10 * 86_400_000)
        self.emit(result)

    def emit(self, result):
        self.write_changelog()
        if result.closed_to_ms is None:
            return
        for w in result.closed:
            self.files[w.start_ms] = list(w.samples)
            self.stale.discard(w.start_ms)
        for w in sorted(self.stale):
            if w < result.closed_to_ms and (result.closed_from_ms is None or w >= result.closed_from_ms):
                del self.files[w]
                self.stale.discard(w)
        self.pending = True

    def crash(self, rng):
        """A new incarnation: the durable changelog plus, per partition, some
        of the messages that were in flight; offsets from the last commit."""
        in_flight = self.changelog[self.durable :]
        cut = {p: rng.randint(0, sum(1 for m in in_flight if m[0] == p)) for p in {m[0] for m in in_flight}}
        survived, seen = list(self.changelog[: self.durable]), dict.fromkeys(cut, 0)
        for message in in_flight:
            if seen[message[0]] < cut[message[0]]:
                survived.append(message)
            seen[message[0]] += 1
        return Shell(self.events, survived, self.committed, self.files)


@pytest.mark.parametrize("seed", range(8))
def test_crashes_anywhere_lose_and_duplicate_nothing(world, seed):
    simulator, events, expected = world
    rng = random.Random(seed)
    shell = Shell(events)
    crashes = 0
    while shell.position < len(events):
        shell.step(rng.randint(50, 700))
        if rng.random() < 0.15:
            shell = shell.crash(rng)
            crashes += 1
    shell.step(1)  # commit + finalize what is pending
    shell.emit(shell.core.advance(shell.core.watermark_ms + 7_200_000))
    assert crashes > 0
    assert_samples_match([s for samples in shell.files.values() for s in samples], expected)


def test_the_state_is_json_and_survives_a_round_trip(world):
    simulator, events, expected = world
    partitions = {(e.topic, e.partition) for e in events}
    core = JoinCore(JoinSettings(), {})
    core.process(events[:3000], T0 + 86_400_000, partitions)
    restored = JoinCore(JoinSettings(), orjson.loads(orjson.dumps(core.requests)), copy.deepcopy(core.progress()))
    a = core.process(events[3000:6000], T0 + 86_400_000, partitions)
    b = restored.process(events[3000:6000], T0 + 86_400_000, partitions)
    assert a.closed
    assert [(w.start_ms, w.samples) for w in a.closed] == [(w.start_ms, w.samples) for w in b.closed]


def test_windows_must_be_whole_seconds():
    from freshtower.core.settings import StreamsConfig

    assert JoinSettings.from_config(StreamsConfig(window_seconds=5)).window_ms == 5_000
    with pytest.raises(ValueError, match="whole seconds"):
        JoinSettings.from_config(StreamsConfig(window_seconds=2.5))
