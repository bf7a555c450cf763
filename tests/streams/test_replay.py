from __future__ import annotations

import json
import time

import msgspec
import pytest
from freshtower.streams.replay import ReplayError, load_event_log, replay

from freshtower.app.simulator import Simulator, SimulatorConfig
from tests.streams.conftest import read_topic, streams_settings


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "events.jsonl"
    counts = Simulator(SimulatorConfig(users=40, items=30, requests_per_day=150, seed=4)).write_events(path, [0])
    return path, counts


def test_replay_produces_every_event_keyed_by_user_in_event_time_order(kafka_broker, tmp_path, small_log):
    path, counts = small_log
    settings = streams_settings(kafka_broker.bootstrap, tmp_path)
    produced = replay(settings, path)
    t = settings.topics
    names = {"impressions": t.impressions, "clicks": t.clicks, "rank-logs": t.rank_logs}
    assert produced == {names[k]: v for k, v in counts.items()}
    for topic in names.values():
        records = read_topic(settings.bootstrap_servers, topic)
        assert len(records) == produced[topic]
        by_partition = {}
        for r in records:
            event = msgspec.json.decode(r.value)
            assert r.key == event["user_id"].encode()
            by_partition.setdefault(r.partition, []).append(event["ts"])
        assert len(by_partition) > 1  # spread by key
        assert all(ts == sorted(ts) for ts in by_partition.values())


def test_a_log_out_of_order_is_replayed_in_event_time_order(tmp_path, small_log):
    path, _ = small_log
    lines = path.read_text().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(reversed(lines)) + "\n")
    settings = streams_settings("127.0.0.1:1", tmp_path)
    times = [e.ts for e in load_event_log(shuffled, settings)]
    assert times == sorted(times) and len(times) == len(lines)


def test_file_order_keeps_the_logs_disorder(tmp_path, small_log):
    path, _ = small_log
    lines = path.read_text().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(reversed(lines)) + "\n")
    settings = streams_settings("127.0.0.1:1", tmp_path)
    times = [e.ts for e in load_event_log(shuffled, settings, file_order=True)]
    assert times == [json.loads(line)["event"]["ts"] for line in reversed(lines)] and times != sorted(times)


def test_speedup_paces_event_time_against_the_wall_clock(kafka_broker, tmp_path):
    # Four events spread over 3 s of event time, at 2x: about 1.5 s.
    path = tmp_path / "paced.jsonl"
    with open(path, "w") as handle:
        for n in range(4):
            event = {"event_id": f"c{n}", "request_id": "r", "user_id": "u1", "item_id": "i", "ts": 1_795_132_800_000 + n * 1000}
            handle.write(json.dumps({"topic": "clicks", "event": event}) + "\n")
    settings = streams_settings(kafka_broker.bootstrap, tmp_path)
    start = time.monotonic()
    assert replay(settings, path, speedup=2.0) == {settings.topics.clicks: 4}
    assert 1.4 <= time.monotonic() - start < 10


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not JSON"),
        ('{"topic": "views", "event": {"user_id": "u", "ts": 1}}', "missing 'views'"),
        ('{"topic": "clicks", "event": {"user_id": "u", "ts": "1"}}', "integer"),
    ],
)
def test_a_bad_line_stops_the_replay_with_its_line_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"topic": "clicks", "event": {"user_id": "u", "ts": 1}}\n' + line + "\n")
    with pytest.raises(ReplayError, match=f"bad.jsonl:2: .*{message}"):
        load_event_log(path, streams_settings("127.0.0.1:1", tmp_path))


def test_input_topics_with_another_partition_count_are_refused(kafka_broker, tmp_path):
    from freshtower.streams.topics import ensure_topics
    from kafka.admin import KafkaAdminClient, NewTopic

    settings = streams_settings(kafka_broker.bootstrap, tmp_path)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    admin.create_topics([NewTopic(settings.topics.clicks, 2, 1)])
    admin.close()
    with pytest.raises(RuntimeError, match=r"do not have streams.partitions = 4 partitions"):
        ensure_topics(settings)
