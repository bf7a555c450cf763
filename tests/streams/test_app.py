"""The streams worker end to end: the session's real broker, a real
``freshtower streams`` process, the simulator's samples as the oracle."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest
from freshtower.streams.dead_letters import decode_dead_letter
from freshtower.streams.frequency_snapshots import load_snapshot
from freshtower.streams.replay import replay
from kafka import KafkaProducer

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.batches import Sample, list_batches, read_batch, read_closed_through
from freshtower.core.ports import free_port
from tests.streams.conftest import committed_and_end_offsets, read_topic, streams_settings
from tests.streams.oracle import SPEC, assert_samples_match, batch_keys, expected_samples

pytestmark = pytest.mark.slow

# ~12,000 requests in a day: about 52,000 events (rank log + impression +
# ~2.3 clicks each) and 120,000 samples.
DAY_WORLD = SimulatorConfig(users=2000, items=500, topics=10, requests_per_day=12_000, seed=11)
JOIN_WINDOW_MS = 1_800_000


@pytest.fixture(scope="module")
def day_log(tmp_path_factory):
    simulator = Simulator(DAY_WORLD)
    path = tmp_path_factory.mktemp("day") / "events.jsonl"
    counts = simulator.write_events(path, [0])
    last_ts = max(msgspec.json.decode(line)["event"]["ts"] for line in path.read_bytes().splitlines())
    return simulator, path, counts, expected_samples(simulator, [0]), last_ts


def batch_samples(batches_dir) -> list[Sample]:
    return [s for ref in list_batches(batches_dir) for s in file_samples(ref)]


def file_samples(ref) -> list[Sample]:
    c = read_batch(ref, SPEC, positives_only=False, verify_checksum=True)
    hard_negatives = c.hard_negative_ids  # a property that builds every row's
    samples = []
    for n in range(len(c)):
        samples.append(
            Sample(
                c.user_ids[n],
                c.item_ids[n],
                int(c.labels[n]),
                int(c.event_time_ms[n]),
                c.request_ids[n],
                int(c.positions[n]),
                {k: v[n] for k, v in c.user_categorical.items()},
                {k: float(c.user_numeric[n, i]) for i, k in enumerate(SPEC.user_numeric)},
                {k: v[n] for k, v in c.item_categorical.items()},
                hard_negatives[n],
                float(c.teacher_scores[n]),
            )
        )
    return samples


def finished(last_ts: int, settings):
    """The watermark is past every window the log can fill (the last
    label-0 window closes join window + window + lateness after the end)."""
    s = settings.streams
    done_at = last_ts + JOIN_WINDOW_MS + (s.window_seconds + s.allowed_lateness_seconds) * 1000
    return lambda stats: stats["watermark_ms"] is not None and stats["watermark_ms"] >= done_at and stats["open_requests"] == 0


def test_a_replayed_day_becomes_batches_that_match_the_simulator(kafka_broker, tmp_path, day_log, worker_factory):
    simulator, path, counts, expected, last_ts = day_log
    assert sum(counts.values()) >= 50_000
    settings = streams_settings(kafka_broker.bootstrap, tmp_path / "data")
    worker = worker_factory(settings)
    worker.wait_for(lambda s: True, 90, "a ready worker")
    replay(settings, path)
    stats = worker.wait_for(finished(last_ts, settings), 240, "the whole day in batches")

    samples = batch_samples(settings.batches_dir)
    assert_samples_match(samples, expected)  # every clicked pair once with label 1, every shown one once with label 0
    assert stats["events_in"] == sum(counts.values()) and stats["dead_letters"] == 0 and stats["late_records"] == 0
    assert stats["records_out"] == len(expected) and stats["join_hit_rate"] == 1.0

    # Announcements: one per batch, naming the file, its counts and checksum.
    refs = {ref.manifest.file and f"{ref.manifest_path.parent.name}/{ref.manifest.file}": ref for ref in list_batches(settings.batches_dir)}
    announced = [msgspec.json.decode(r.value) for r in read_topic(settings.bootstrap_servers, settings.topics.training_batches)]
    assert sorted(a["path"] for a in announced) == sorted(refs)
    for a in announced:
        ref = refs[a["path"]]
        data = (settings.batches_dir / a["path"]).read_bytes()
        assert a["sha256"] == hashlib.sha256(data).hexdigest() == ref.manifest.sha256
        assert (a["records"], a["positives"], a["shown"]) == (ref.manifest.records, ref.manifest.positives, ref.manifest.shown)
        assert (a["window_start_ms"], a["window_end_ms"]) == (ref.manifest.window_start_ms, ref.manifest.window_end_ms)
    assert sum(a["records"] for a in announced) == len(expected)

    # Each partition's frequency estimator followed its clicks: after its
    # last batch it has seen every click of the partition once.
    last = {}
    for a in sorted(announced, key=lambda a: a["window_start_ms"]):
        last[a["partition"]] = a
    steps = [load_snapshot(settings.batches_dir / a["frequency_state"]).step for a in last.values()]
    assert steps == [a["frequency_step"] for a in last.values()]
    assert len(last) == settings.streams.partitions and sum(steps) == sum(1 for k in expected if k[2] == 1)

    # Each partition recorded how far it closed its windows: past its own
    # newest batch, and past the stream's end (the daily trainer's clock).
    closed = read_closed_through(settings.batches_dir)
    assert sorted(closed) == [f"p{p}" for p in range(settings.streams.partitions)]
    for a in last.values():
        assert closed[f"p{a['partition']}"] >= a["window_end_ms"]
    assert min(closed.values()) > last_ts

    metrics = worker.get("/metrics").decode()
    assert f'freshtower_streams_events_total{{kind="click"}} {float(counts["clicks"])}' in metrics
    assert "freshtower_streams_watermark_lag_seconds" in metrics and "freshtower_streams_join_hit_rate 1.0" in metrics
    assert worker.stop() == 0
    # Every input offset was committed, none beyond the log's end.
    t = settings.topics
    committed, ends = committed_and_end_offsets(settings.bootstrap_servers, settings.streams.app_id, [t.impressions, t.clicks, t.rank_logs])
    assert committed == ends


def test_bad_events_go_to_dead_letters_and_the_good_ones_still_arrive(kafka_broker, tmp_path, worker_factory):
    simulator = Simulator(SimulatorConfig(users=200, items=100, topics=5, requests_per_day=1000, seed=12))
    path = tmp_path / "events.jsonl"
    simulator.write_events(path, [0])
    expected = expected_samples(simulator, [0])
    settings = streams_settings(kafka_broker.bootstrap, tmp_path / "data")
    t = settings.topics
    worker = worker_factory(settings)
    worker.wait_for(lambda s: True, 90, "a ready worker")

    day = 1_795_132_800_000
    click = {"event_id": "bad-1", "request_id": "d0-r5", "user_id": "u1", "item_id": "i1", "ts": day + 3_600_000}
    bad = {
        "invalid_json": (t.clicks, b"u1", b'{"event_id": "x", '),
        "empty_message": (t.impressions, b"u1", b""),
        "missing_field": (t.clicks, b"u1", msgspec.json.encode({k: v for k, v in click.items() if k != "item_id"})),
        "wrong_type": (t.clicks, b"u1", msgspec.json.encode(click | {"ts": str(click["ts"])})),
        "bad_timestamp": (t.clicks, b"u1", msgspec.json.encode(click | {"ts": -5})),
        "future_timestamp": (t.clicks, b"u1", msgspec.json.encode(click | {"ts": 4_102_444_800_000})),  # 2100
        "bad_id": (
            t.impressions,
            b"u1",
            msgspec.json.encode(
                {"event_id": "", "request_id": "x", "user_id": "u1", "ts": day, "items": [{"item_id": "a", "position": 0}]}
            ),
        ),
        "oversized": (t.rank_logs, b"u1", b'{"pad": "' + b"x" * 1_000_000 + b'"}'),
        "orphan_click": (t.clicks, b"u1", msgspec.json.encode(click | {"request_id": "never-shown"})),
        "key_mismatch": (t.clicks, b"someone-else", msgspec.json.encode(click)),
    }
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, max_request_size=2_000_000)
    sources = {}
    for reason, (topic, key, value) in bad.items():
        metadata = producer.send(topic, key=key, value=value).get(30)
        sources[reason] = (metadata.topic, metadata.partition, metadata.offset)
    producer.close()
    replay(settings, path)  # the good events, after and around the bad ones
    last_ts = max(s.event_time_ms for s in expected.values())
    stats = worker.wait_for(finished(last_ts, settings), 180, "every window written")

    letters = [decode_dead_letter(r.value) for r in read_topic(settings.bootstrap_servers, t.dead_letters)]
    by_source = {(d["source"]["topic"], d["source"]["partition"], d["source"]["offset"]): d for d in letters}
    for reason, (topic, key, value) in bad.items():
        letter = by_source[sources[reason]]
        assert letter["code"] == reason, letter["reason"]
        assert letter["key"] == key and letter["value_bytes"] == len(value)
        assert letter["value"] == value[: settings.streams.max_event_bytes]
        assert letter["value_truncated"] == (reason == "oversized")
        assert letter["reason"]  # says what and where
    assert len(letters) == len(bad) == stats["dead_letters"]
    assert_samples_match(batch_samples(settings.batches_dir), expected)
    assert worker.stop() == 0


def test_a_worker_killed_mid_stream_restarts_without_losing_or_duplicating_a_record(kafka_broker, tmp_path, day_log, worker_factory):
    simulator, path, counts, expected, last_ts = day_log
    # Small micro-batches make the redelivery bound (below) tight, and Faust's periodic commit is
    # pushed out of the run: the worker's own commits after each delivered micro-batch must hold it.
    settings = streams_settings(
        kafka_broker.bootstrap,
        tmp_path / "data",
        micro_batch_size=200,
        max_uncommitted_micro_batches=2,
        commit_interval_seconds=60,
        window_seconds=3 * 3600,
    )
    replay(settings, path)
    first = worker_factory(settings, "first")
    before = first.wait_for(lambda s: s["records_out"] >= 0.5 * len(expected), 180, "half of the records written")
    first.kill()
    assert 0 < before["records_out"] < len(expected)
    written_before = {ref.window_start_ms for ref in list_batches(settings.batches_dir)}

    second = worker_factory(settings, "second")
    stats = second.wait_for(finished(last_ts, settings), 240, "the rest of the day after the restart")
    assert stats["recovered_open_requests"] > 0  # join state came back from the changelog
    assert stats["dead_letters"] == 0, stats["counters"]  # replayed events are duplicates, not orphans
    # Offsets are committed right after each micro-batch's output is delivered, so what the second
    # worker reads again (and recognises as duplicates; the log itself has none) is at most what was
    # in flight at the kill: the uncommitted micro-batches plus the one being processed.
    s = settings.streams
    redelivery_bound = (s.max_uncommitted_micro_batches + 1) * s.micro_batch_size
    assert stats["duplicates"] <= redelivery_bound, (stats["duplicates"], redelivery_bound, stats["counters"])
    assert second.stop() == 0

    # One join-state lineage per partition across the restart: the state
    # came back, so no batch of the first run was taken for another lineage's.
    writers = {(ref.manifest.extras["partition"], ref.manifest.extras["writer"]) for ref in list_batches(settings.batches_dir)}
    assert len(writers) == len({p for p, _ in writers}) == settings.streams.partitions
    assert all(w.startswith(settings.streams.app_id + ":") for _, w in writers)
    keys = batch_keys(settings.batches_dir)
    duplicated = {k: n for k, n in keys.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} records duplicated, e.g. {list(duplicated.items())[:3]}"
    assert set(keys) == set(expected), f"missing {len(set(expected) - set(keys))}, unexpected {len(set(keys) - set(expected))}"
    assert written_before and Counter(k[2] for k in keys) == Counter(k[2] for k in expected)


def test_a_worker_that_cannot_write_its_batches_stops_with_the_reason_and_a_restart_loses_nothing(kafka_broker, tmp_path, worker_factory):
    simulator = Simulator(SimulatorConfig(users=50, items=30, requests_per_day=300, seed=13))
    path = tmp_path / "events.jsonl"
    simulator.write_events(path, [0])
    settings = streams_settings(kafka_broker.bootstrap, tmp_path / "data")
    settings.data_dir.mkdir(parents=True)
    settings.batches_dir.write_text("a file where the batches directory should be")
    replay(settings, path)
    worker = worker_factory(settings)
    assert worker.process.wait(120) != 0
    log = worker.log_path.read_text()
    assert "join failed; stopping the worker" in log and f"Not a directory: '{settings.batches_dir}" in log
    t = settings.topics
    committed, ends = committed_and_end_offsets(settings.bootstrap_servers, settings.streams.app_id, [t.impressions, t.clicks, t.rank_logs])
    assert any((committed[tp] or 0) < ends[tp] for tp in ends)  # what could not be written is read again next time
    # Once the directory can be written, a restarted worker writes every sample, once.
    settings.batches_dir.unlink()
    expected = expected_samples(simulator, [0])
    again = worker_factory(settings, "again")
    again.wait_for(finished(max(s.event_time_ms for s in expected.values()), settings), 180, "every window written")
    assert batch_keys(settings.batches_dir) == {key: 1 for key in expected}
    assert again.stop() == 0


# --- scale-out: workers sharing one consumer group ---------------------------------

# ~3,000 requests: about 13,000 events and 30,000 samples; 30-minute
# windows keep the file count (windows x partitions) and the reading low.
SPLIT_WINDOW_SECONDS = 1800
SPLIT_WORLD = SimulatorConfig(users=600, items=300, topics=10, requests_per_day=3000, seed=21)


@pytest.fixture(scope="module")
def small_day_log(tmp_path_factory):
    simulator = Simulator(SPLIT_WORLD)
    path = tmp_path_factory.mktemp("small-day") / "events.jsonl"
    counts = simulator.write_events(path, [0])
    expected = expected_samples(simulator, [0])
    return path, counts, expected, max(s.event_time_ms for s in expected.values())


def second_worker_settings(settings):
    """The same app (consumer group, topics, data directory), its own web port."""
    return settings.model_copy(update={"streams": settings.streams.model_copy(update={"web_port": free_port()})})


def stop_all(workers) -> list[int]:
    """SIGTERM every worker at once (each takes seconds to leave the group), then wait."""
    with ThreadPoolExecutor(len(workers)) as pool:
        return list(pool.map(lambda w: w.stop(), workers))


def assert_each_user_in_one_partition_file_set(samples_by_file: dict[int, set[str]]) -> None:
    owners: dict[str, set[int]] = {}
    for partition, users in samples_by_file.items():
        for user in users:
            owners.setdefault(user, set()).add(partition)
    assert all(len(p) == 1 for p in owners.values()), "a user's samples are in files of two partitions"


def test_two_workers_in_one_group_split_the_partitions_and_write_what_one_would(kafka_broker, tmp_path, small_day_log, worker_factory):
    path, counts, expected, last_ts = small_day_log
    settings = streams_settings(kafka_broker.bootstrap, tmp_path / "data", window_seconds=SPLIT_WINDOW_SECONDS)
    workers = [worker_factory(settings, "a"), worker_factory(second_worker_settings(settings), "b")]
    everything = set(range(settings.streams.partitions))

    def split(stats_of):
        return lambda stats: len(stats["partitions"]) > 0 and not set(stats["partitions"]) & set(stats_of().get("partitions") or [])

    # Both in the group and the partitions split between them before the events come.
    for me, other in ((0, 1), (1, 0)):
        workers[me].wait_for(split(lambda other=other: workers[other].stats() or {}), 90, "its share of the partitions")
    owned = [set(w.stats()["partitions"]) for w in workers]
    assert owned[0] | owned[1] == everything and not owned[0] & owned[1]
    replay(settings, path)
    stats = [w.wait_for(finished(last_ts, settings), 120, "every window written") for w in workers]

    assert [set(s["partitions"]) for s in stats] == owned  # no rebalance meanwhile
    refs = list_batches(settings.batches_dir)
    samples, users_by_partition = [], {}
    for ref in refs:  # one batch per window and partition
        partition = ref.manifest.extras["partition"]
        assert ref.manifest.file.endswith(f"-p{partition}.tfrecord")
        in_file = file_samples(ref)
        samples += in_file
        users_by_partition.setdefault(partition, set()).update(s.user_id for s in in_file)
    assert_samples_match(samples, expected)  # every clicked pair once with label 1, every shown one once
    assert all(s["records_out"] > 0 for s in stats) and sum(s["records_out"] for s in stats) == len(expected)
    assert sum(s["events_in"] for s in stats) == sum(counts.values())
    assert all(s["dead_letters"] == 0 and s["late_records"] == 0 for s in stats)
    assert set(users_by_partition) == everything
    assert_each_user_in_one_partition_file_set(users_by_partition)
    announced = [msgspec.json.decode(r.value) for r in read_topic(settings.bootstrap_servers, settings.topics.training_batches)]
    assert sorted(a["path"] for a in announced) == sorted(f"{r.manifest_path.parent.name}/{r.manifest.file}" for r in refs)
    assert sum(a["records"] for a in announced) == len(expected)

    assert stop_all(workers) == [0, 0]
    t = settings.topics
    committed, ends = committed_and_end_offsets(settings.bootstrap_servers, settings.streams.app_id, [t.impressions, t.clicks, t.rank_logs])
    assert committed == ends


def test_a_day_delivered_again_after_a_restart_counts_once(kafka_broker, tmp_path, small_day_log, worker_factory):
    """Every request of the day left the join state and the worker stopped;
    then the whole day comes again. The next worker knows the written-out
    event IDs only from the ``join-written-ids`` changelog, and must count
    every copy as a duplicate: nothing written again, nothing dead-lettered."""
    path, counts, expected, last_ts = small_day_log
    # Once idle, event time runs an hour a wall second here (idle_advance_rate), so a day's horizon
    # would expire while the worker stops and the next one starts: a week's keeps the test about restarts.
    settings = streams_settings(
        kafka_broker.bootstrap, tmp_path / "data", window_seconds=SPLIT_WINDOW_SECONDS, dedup_horizon_seconds=7 * 86_400
    )
    replay(settings, path)
    first = worker_factory(settings, "first")
    first.wait_for(finished(last_ts, settings), 120, "every window written")
    assert first.stop() == 0
    before = {ref.manifest_path: ref.manifest.file for ref in list_batches(settings.batches_dir)}

    replay(settings, path)  # the same day again, later in every partition
    second = worker_factory(settings, "second")
    total = sum(counts.values())
    stats = second.wait_for(lambda s: s["events_in"] >= total and s["open_requests"] == 0, 120, "the day read again")
    assert stats["events_in"] == total
    assert stats["duplicates"] == total, stats["counters"]
    assert stats["dead_letters"] == 0 and stats["records_out"] == 0, stats["counters"]
    assert second.stop() == 0
    assert {ref.manifest_path: ref.manifest.file for ref in list_batches(settings.batches_dir)} == before
    keys = batch_keys(settings.batches_dir)
    assert set(keys) == set(expected) and max(keys.values()) == 1


def test_a_worker_joining_mid_stream_takes_over_partitions_with_their_join_state(kafka_broker, tmp_path, small_day_log, worker_factory):
    path, _, expected, last_ts = small_day_log
    settings = streams_settings(kafka_broker.bootstrap, tmp_path / "data", window_seconds=SPLIT_WINDOW_SECONDS)
    first = worker_factory(settings, "first")
    first.wait_for(lambda s: len(s["partitions"]) == settings.streams.partitions, 90, "all partitions")
    # The day streams in over ~30 s, longer than a worker takes to start and
    # join even on a busy machine, so the second one joins mid-stream.
    replaying = threading.Thread(target=replay, args=(settings, path), kwargs={"speedup": 3000})
    replaying.start()
    try:
        first.wait_for(lambda s: s["records_out"] > 0, 60, "a first batch written")
        second = worker_factory(second_worker_settings(settings), "second")
        taken = second.wait_for(lambda s: len(s["partitions"]) > 0, 90, "partitions handed over")
    finally:
        replaying.join()
    assert taken["recovered_open_requests"] > 0  # the moved partitions' join state came along
    stats = [w.wait_for(finished(last_ts, settings), 120, "every window written") for w in (first, second)]
    assert set(stats[0]["partitions"]) | set(stats[1]["partitions"]) == set(range(settings.streams.partitions))
    assert all(s["dead_letters"] == 0 for s in stats)

    keys = batch_keys(settings.batches_dir)
    duplicated = {k: n for k, n in keys.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} records duplicated, e.g. {list(duplicated.items())[:3]}"
    assert set(keys) == set(expected), f"missing {len(set(expected) - set(keys))}, unexpected {len(set(keys) - set(expected))}"
    # A moved partition keeps its lineage: one per partition, none started anew.
    writers = {(ref.manifest.extras["partition"], ref.manifest.extras["writer"]) for ref in list_batches(settings.batches_dir)}
    assert len(writers) == len({p for p, _ in writers}) == settings.streams.partitions
    assert stop_all([first, second]) == [0, 0]


def test_events_from_a_librdkafka_producer_join_whichever_partitioner_it_uses(kafka_broker, tmp_path, worker_factory):
    import confluent_kafka

    simulator = Simulator(SimulatorConfig(users=200, items=100, topics=5, requests_per_day=600, seed=14))
    path = tmp_path / "events.jsonl"
    simulator.write_events(path, [0])
    expected = expected_samples(simulator, [0])
    # The clicks are produced after the impressions: the idle clock (an hour of event time a second once a
    # source is quiet) must not start in that gap, or a stalled CPU closes the windows before the clicks arrive.
    settings = streams_settings(kafka_broker.bootstrap, tmp_path / "data", idle_seconds=20)
    t = settings.topics
    worker = worker_factory(settings)
    worker.wait_for(lambda s: True, 90, "a ready worker")
    lines = [msgspec.json.decode(line) for line in path.read_bytes().splitlines()]
    # Impressions and rank logs from kafka-python (murmur2), clicks from confluent-kafka: half of
    # the users with partitioner=murmur2_random, half with librdkafka's default (CRC32).
    from freshtower.streams.replay import LoggedEvent, replay_events

    others = [LoggedEvent(r["event"]["ts"], {"impressions": t.impressions, "rank-logs": t.rank_logs}[r["topic"]],
                          r["event"]["user_id"].encode(), msgspec.json.encode(r["event"])) for r in lines if r["topic"] != "clicks"]
    replay_events(settings, sorted(others, key=lambda e: e.ts))
    clicks = sorted((r["event"] for r in lines if r["topic"] == "clicks"), key=lambda e: e["ts"])
    producers = {
        "murmur2_random": confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers, "partitioner": "murmur2_random"}),
        "consistent_random": confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers}),
    }
    by_partitioner = Counter()
    # Both producers write to the same partitions. Each is flushed before the other takes over, so that a
    # partition receives its clicks in event-time order: two producers racing over a whole replayed day
    # (milliseconds of wall time) reorder event time by hours, far past the allowed lateness, and a window
    # closed by one producer's later clicks would count the other's earlier ones as late.
    previous = None
    for click in clicks:
        name = "murmur2_random" if int(click["user_id"][1:]) % 2 == 0 else "consistent_random"
        if previous is not None and name != previous:
            assert producers[previous].flush(30) == 0
        producers[name].produce(t.clicks, key=click["user_id"].encode(), value=msgspec.json.encode(click))
        previous = name
        by_partitioner[name] += 1
    for producer in producers.values():
        assert producer.flush(30) == 0
    del producers  # librdkafka clients close when collected: before the session's broker stops
    last_ts = max(s.event_time_ms for s in expected.values())
    worker.wait_for(finished(last_ts, settings), 180, "every window written")

    # The CRC32 producer's clicks that landed on another partition than murmur2's went through the
    # repartition topic (with streams.repartition off they were dead-lettered wrong_partitioner):
    # every sample is the simulator's, once.
    letters = [decode_dead_letter(r.value) for r in read_topic(settings.bootstrap_servers, t.dead_letters)]
    assert letters == []
    from freshtower.streams.placement import Placement

    placement = Placement(settings.streams.partitions)
    again = read_topic(settings.bootstrap_servers, f"{settings.streams.app_id}-{t.clicks}-repartition")
    moved = {r.key.decode() for r in again}
    assert len(again) > 50 and all(int(u[1:]) % 2 == 1 for u in moved)  # only the CRC32 producer's clicks
    assert all(r.partition == placement.partition(r.key) for r in again)
    assert worker.stats()["counters"]["rerouted.click"] == len(again)
    assert batch_keys(settings.batches_dir) == {key: 1 for key in expected}
    assert worker.stop() == 0
