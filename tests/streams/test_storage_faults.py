"""The streams worker on a real full disk and a read-only data directory (a
size-limited tmpfs under ``data_dir``): it stops with the batch file named,
commits no offset past what it wrote, leaves no partial batch, and once
space returns a restarted worker (as a process manager would start it)
ends with exactly the simulator's samples, none lost, none doubled."""

from __future__ import annotations

import time

import pytest
from freshtower.streams.replay import load_event_log, replay_events

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.batches import list_batches, read_batch
from freshtower.core.ports import free_port
from tests.streams.conftest import committed_and_end_offsets, streams_settings
from tests.streams.oracle import SPEC, batch_keys, expected_samples

pytestmark = pytest.mark.slow

WORLD = SimulatorConfig(users=50, items=30, requests_per_day=300, seed=13)
JOIN_WINDOW_MS = 1_800_000


def with_streams(settings, **changes):
    return settings.model_copy(update={"streams": settings.streams.model_copy(update={"web_port": free_port(), **changes})})


def wait_quiet(worker, timeout: float, what: str, quiet_seconds: float = 4.0) -> dict:
    """Stats once ``batches`` has not changed for ``quiet_seconds``."""
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = worker.wait_for(lambda s: True, 60, what)
        if stats["batches"] != last:
            last, since = stats["batches"], time.monotonic()
        elif time.monotonic() - since >= quiet_seconds and last:
            return stats
        time.sleep(0.5)
    raise AssertionError(f"no quiet spell while waiting for {what}")


def assert_stopped_naming_the_batch_file(worker, settings, reason: str) -> None:
    assert worker.process.wait(120) != 0
    log = worker.log_path.read_text()
    assert f"cannot write {settings.batches_dir}/" in log and reason in log, worker.log_tail()
    t = settings.topics
    committed, ends = committed_and_end_offsets(settings.bootstrap_servers, settings.streams.app_id, [t.impressions, t.clicks, t.rank_logs])
    assert any((committed[tp] or 0) < ends[tp] for tp in ends)  # what it could not write is read again next time


def assert_every_batch_whole(settings) -> int:
    refs = list_batches(settings.batches_dir)
    for ref in refs:
        read_batch(ref, SPEC, positives_only=False, verify_checksum=True)  # a listed batch is complete and checksummed
    return len(refs)


def test_a_full_disk_and_a_read_only_data_directory_stop_the_worker_and_a_restart_writes_every_sample_once(
    kafka_broker, tmp_path, worker_factory, small_disk
):
    simulator = Simulator(WORLD)
    path = tmp_path / "events.jsonl"
    simulator.write_events(path, [0])
    expected = expected_samples(simulator, [0])
    disk = small_disk(64 << 20)
    # Windows close only as events move the watermark (no idle clock), so each third of the day closes
    # the windows before it and the next third's windows are written by the next worker.
    settings = streams_settings(kafka_broker.bootstrap, disk.path / "data", idle_advance_rate=0)
    events = load_event_log(path, settings)
    thirds = [events[: len(events) // 3], events[len(events) // 3 : 2 * len(events) // 3], events[2 * len(events) // 3 :]]

    replay_events(settings, thirds[0])
    first = worker_factory(settings, "first")
    wait_quiet(first, 180, "the first third's batches")
    written_first = assert_every_batch_whole(settings)
    disk.fill()  # the disk fills up mid-run
    replay_events(settings, thirds[1])
    assert_stopped_naming_the_batch_file(first, settings, "No space left on device")
    assert assert_every_batch_whole(settings) >= written_first

    disk.free()  # space returns: start it again
    second = worker_factory(with_streams(settings), "second")
    stats = wait_quiet(second, 180, "the second third's batches")
    assert stats["batches"] > 0
    second.stop()
    written_second = assert_every_batch_whole(settings)
    assert written_second > written_first

    disk.read_only()  # the data directory turns read-only mid-run
    third = worker_factory(with_streams(settings), "third")
    replay_events(settings, thirds[2])
    assert_stopped_naming_the_batch_file(third, settings, "Read-only file system")
    disk.writable()
    assert assert_every_batch_whole(settings) == written_second

    last_ts = events[-1].ts
    finish = with_streams(settings, idle_advance_rate=3600)  # once the log is read, event time runs an hour a second
    fourth = worker_factory(finish, "fourth")
    s = finish.streams
    done_at = last_ts + JOIN_WINDOW_MS + (s.window_seconds + s.allowed_lateness_seconds) * 1000
    done = lambda st: st["watermark_ms"] is not None and st["watermark_ms"] >= done_at and st["open_requests"] == 0  # noqa: E731
    fourth.wait_for(done, 240, "the day")
    assert fourth.stop() == 0

    assert_every_batch_whole(settings)
    keys = batch_keys(settings.batches_dir)
    duplicated = {k: n for k, n in keys.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} records written twice, e.g. {list(duplicated.items())[:3]}"
    assert set(keys) == set(expected), f"missing {len(set(expected) - set(keys))}, unexpected {len(set(keys) - set(expected))}"
    print(f"\nstorage faults: {len(events)} events, {sum(keys.values())} samples written, {len(expected)} in the oracle, "
          f"0 duplicates, {len(set(expected) - set(keys))} lost")
