"""The publisher's statistics feed: what a release's ``statistics.npz``
holds, read incrementally while batches arrive, against a brute-force
count over every statistics row on disk."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from freshtower.publisher.statistics_feed import StatisticsFeed, load_statistics, statistics_bytes, statistics_snapshots

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.batches import BatchFormatError, list_batches
from freshtower.core.batches.ranking import read_statistics_rows
from freshtower.core.eventtime import HOUR_MS, MINUTE_MS
from freshtower.core.fingerprints import fingerprint_strings
from freshtower.core.statistics import CLICKS, DAY, HOUR, IMPRESSIONS, user_category_keys
from tests.streams.oracle import stream_batches

pytestmark = pytest.mark.slow  # two simulated days through the streams join and sink


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Two simulated days through one partition's join and sink."""
    directory = tmp_path_factory.mktemp("feed-source") / "batches"
    stream_batches(Simulator(SimulatorConfig(users=40, items=60, topics=5, requests_per_day=400, seed=3)), [0, 1], directory)
    return directory


def copy_batches(source: Path, target: Path, refs) -> None:
    """Copy whole batches, manifest last, as the sink writes them."""
    for ref in refs:
        day = target / ref.manifest_path.parent.name
        day.mkdir(parents=True, exist_ok=True)
        stem = ref.manifest_path.stem
        for path in sorted(ref.manifest_path.parent.glob(stem + ".*")):
            if path.suffix != ".json":
                shutil.copyfile(path, day / path.name)
        shutil.copyfile(ref.manifest_path, day / ref.manifest_path.name)


def brute_force(batches: Path, as_of_ms: int) -> dict[str, dict[int, np.ndarray]]:
    """Every key's (hour, day) counts as of a request at ``as_of_ms``, by
    counting each statistics row on disk against the definitions."""
    minute = as_of_ms // MINUTE_MS * MINUTE_MS
    hour_start = as_of_ms // HOUR_MS * HOUR_MS
    counts = {name: Counter() for name in ("items", "by_category", "by_user")}
    for ref in list_batches(batches):
        rows = read_statistics_rows(ref)
        if rows is None:
            continue
        item_keys = fingerprint_strings(rows.item_ids)
        category_keys = user_category_keys(rows.user_ids, rows.categories)
        user_keys = fingerprint_strings(rows.user_ids)
        for n, t in enumerate(rows.time_ms.tolist()):
            channel = CLICKS if rows.clicked[n] else IMPRESSIONS
            for window, counted in ((HOUR, minute - HOUR_MS <= t < minute), (DAY, hour_start - 23 * HOUR_MS <= t < minute)):
                if not counted:
                    continue
                counts["items"][(int(item_keys[n]), window, channel)] += 1
                counts["by_category"][(int(category_keys[n]), window, channel)] += 1
                if channel == CLICKS:
                    counts["by_user"][(int(user_keys[n]), window, 0)] += 1
    out = {}
    for name, counter in counts.items():
        channels = 1 if name == "by_user" else 2
        table: dict[int, np.ndarray] = {}
        for (key, window, channel), value in counter.items():
            table.setdefault(key, np.zeros((2, channels), dtype=np.int64))[window, channel] = value
        out[name] = table
    return out


def assert_equals_brute_force(snapshots, batches: Path) -> None:
    expected = brute_force(batches, snapshots.as_of_ms)
    for name, table in expected.items():
        part = getattr(snapshots, name)
        got = {int(k): c for k, c in zip(part.keys.tolist(), part.counts)}
        got = {k: c for k, c in got.items() if c.any()}
        assert sorted(got) == sorted(table), name
        for key, counts in table.items():
            np.testing.assert_array_equal(got[key], counts, err_msg=f"{name} key {key}")


def test_the_feed_read_incrementally_equals_a_brute_force_count_at_each_step(source, tmp_path):
    refs = list_batches(source)
    assert len(refs) > 100
    target = tmp_path / "batches"
    feed = StatisticsFeed(target)
    assert feed.snapshot() is None  # nothing yet
    times, read = [], 0
    for cut in (len(refs) // 3, len(refs) // 2, len(refs) - 5, len(refs)):
        copy_batches(source, target, refs[read:cut])
        read = cut
        snapshots = feed.snapshot()
        assert snapshots.as_of_ms == refs[cut - 1].manifest.window_end_ms // MINUTE_MS * MINUTE_MS
        assert_equals_brute_force(snapshots, target)
        assert snapshots.items.counts.sum() > 0 and snapshots.by_user.counts.sum() > 0
        fresh = statistics_snapshots(target)  # from scratch: the same numbers
        for name in ("items", "by_category", "by_user"):
            np.testing.assert_array_equal(getattr(fresh, name).keys, getattr(snapshots, name).keys)
            np.testing.assert_array_equal(getattr(fresh, name).counts, getattr(snapshots, name).counts)
        times.append(snapshots.as_of_ms)
        assert feed.snapshot(newer_than_ms=snapshots.as_of_ms) is None  # the same minute again: no snapshot taken
    assert times == sorted(times) and len(set(times)) == len(times)
    assert feed.batches_read < len(refs) + 1 and feed.recounts == 0  # each batch read once
    # the two days' day windows: counters hold at most 61 minute and 24 hour buckets after advancing
    assert sum(feed._items._counts.buckets()) <= 61 + 24 + 1


def test_a_batch_written_again_is_counted_again_from_scratch(source, tmp_path):
    refs = list_batches(source)
    target = tmp_path / "batches"
    copy_batches(source, target, refs)
    feed = StatisticsFeed(target)
    before = feed.snapshot()
    # a restarted worker wrote its last window again, with one click fewer
    last = next(ref for ref in reversed(list_batches(target)) if (rows := read_statistics_rows(ref)) is not None and rows.clicked.any())
    rows = read_statistics_rows(last)
    stats_name = last.manifest.extras["statistics_rows"]["file"]
    keep = np.ones(len(rows.user_ids), dtype=bool)
    keep[int(np.flatnonzero(rows.clicked)[0])] = False
    rewrite_statistics(last, stats_name, rows, keep)
    after = feed.snapshot()
    assert feed.recounts == 1
    assert_equals_brute_force(after, target)
    if last.manifest.window_end_ms > after.as_of_ms - HOUR_MS:  # inside the hour window: one click fewer
        assert after.items.counts[:, HOUR, CLICKS].sum() == before.items.counts[:, HOUR, CLICKS].sum() - 1


def rewrite_statistics(ref, name: str, rows, keep: np.ndarray) -> None:
    """Write a batch's statistics rows again without the rows ``keep`` drops,
    and its manifest with the new checksum, as a restarted sink would."""
    import io
    import json

    from freshtower.core.storage import sha256_bytes

    buffer = io.BytesIO()
    np.savez(buffer, user_ids=np.array(rows.user_ids)[keep], item_ids=np.array(rows.item_ids)[keep],
             categories=np.array(rows.categories)[keep], time_ms=rows.time_ms[keep], clicked=rows.clicked[keep])
    data = buffer.getvalue()
    (ref.manifest_path.parent / name).write_bytes(data)
    record = json.loads(ref.manifest_path.read_text())
    record["extras"]["statistics_rows"].update(rows=int(keep.sum()), bytes=len(data), sha256=sha256_bytes(data))
    ref.manifest_path.write_text(json.dumps(record))


def test_a_corrupt_statistics_file_is_named_and_never_skipped(source, tmp_path):
    refs = list_batches(source)
    target = tmp_path / "batches"
    copy_batches(source, target, refs)
    victim = next(ref for ref in reversed(list_batches(target)) if "statistics_rows" in ref.manifest.extras)
    path = victim.manifest_path.parent / victim.manifest.extras["statistics_rows"]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    feed = StatisticsFeed(target)
    for _ in range(2):  # the second time too: the feed does not remember it as read
        with pytest.raises(BatchFormatError, match=path.name):
            feed.snapshot()


def test_the_file_round_trips(source):
    snapshots = statistics_snapshots(source)
    path = Path(source).parent / "statistics.npz"
    path.write_bytes(statistics_bytes(snapshots))
    loaded = load_statistics(path)
    assert loaded.as_of_ms == snapshots.as_of_ms and loaded.keys == snapshots.keys > 0
    for name in ("items", "by_category", "by_user"):
        np.testing.assert_array_equal(getattr(loaded, name).counts, getattr(snapshots, name).counts)
