"""Ranking samples and statistics rows: from the join's finished requests
through the sink's files and back through the one decoder; the statistics
stored with each request equal a brute-force count over the events before it."""

from __future__ import annotations

import numpy as np
import pytest
from freshtower.streams.join import JoinCore, JoinSettings
from freshtower.streams.ranking_samples import RankingSampleEmitter
from freshtower.streams.sink import BatchSink

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.batches import list_batches
from freshtower.core.batches.ranking import RankingColumns, read_ranking_samples, read_statistics_rows, statistics_counts
from freshtower.core.eventtime import HOUR_MS, MINUTE_MS
from freshtower.core.frequency import FrequencyEstimator
from freshtower.core.statistics import ItemStatistics, day_window, hour_window
from tests.streams.oracle import SPEC, raw_events

SETTINGS = JoinSettings(window_ms=60_000, lateness_ms=10_000, join_window_ms=600_000)


def simulator() -> Simulator:
    return Simulator(SimulatorConfig(users=60, items=80, topics=6, requests_per_day=1200, seed=3))


def new_emitter() -> RankingSampleEmitter:
    return RankingSampleEmitter("category", "rank", SETTINGS.join_window_ms)


def new_estimator() -> FrequencyEstimator:
    return FrequencyEstimator(buckets=1 << 12, hashes=2, alpha=0.05)


def run_join(events, partition: int, sink: BatchSink, core: JoinCore | None = None, end_ms: int | None = None) -> JoinCore:
    core = core or JoinCore(SETTINGS, {}, partition=partition)
    mine = [e for e in events if e.partition == partition]
    for start in range(0, len(mine), 500):
        result = core.process(mine[start : start + 500], now_ms=_ts(mine[min(start + 499, len(mine) - 1)]))
        for window in result.closed:
            sink.write(window)
        core.finalize()
    if end_ms is not None:
        for window in core.advance(end_ms).closed:
            sink.write(window)
        core.finalize()
    return core


def write_day(tmp_path, partitions=(0, 1)):
    sim = simulator()
    events = raw_events(sim, [0], partitions=len(partitions))
    end = sim.day_start_ms(1) + 2 * SETTINGS.join_window_ms
    for p in partitions:
        run_join(events, p, BatchSink(tmp_path, "w", new_estimator(), partition=p, emitter=new_emitter()), end_ms=end)
    return sim


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    """One simulated day through two partitions' joins and sinks, written once for the module."""
    path = tmp_path_factory.mktemp("day")
    return write_day(path), path


def all_ranking(batches_dir) -> RankingColumns:
    return RankingColumns.concat([read_ranking_samples(r, SPEC) for r in list_batches(batches_dir)], SPEC)


def test_ranking_samples_round_trip_through_the_batch_files(day):
    sim, tmp_path = day
    columns = all_ranking(tmp_path)
    requests = {r.request_id: r for r in sim.requests(0)}
    assert len(columns) > 1000  # every request that reached the join's end (its join window closed)
    assert set(columns.request_ids) <= set(requests)
    for r in range(len(columns)):
        request = requests[columns.request_ids[r]]
        at = slice(columns.offsets[r], columns.offsets[r + 1])
        shown = [sim.item_id(i) for i in request.shown.tolist()]
        dropped = [sim.item_id(i) for i in request.dropped.tolist()]
        assert columns.candidate_ids[at] == shown + dropped
        scores = np.concatenate([request.shown_scores, request.dropped_scores])
        np.testing.assert_allclose(columns.scores[at], scores, atol=1e-4)
        assert columns.kept[at].tolist() == [True] * len(shown) + [False] * len(dropped)
        assert columns.shown[at].tolist() == [True] * len(shown) + [False] * len(dropped)
        assert columns.clicked[at].tolist()[: len(shown)] == request.clicked.tolist()
        assert not columns.clicked[at][len(shown) :].any()
        assert columns.event_time_ms[r] == request.ts_ms and columns.user_ids[r] == sim.user_id(request.user)
        assert columns.categories[at][: len(shown)] == [sim.item_category(i) for i in request.shown.tolist()]
    features = sim.user_features(requests[columns.request_ids[0]].user, int(columns.event_time_ms[0]))
    assert [columns.user_categorical[k][0] for k in SPEC.user_categorical] == [features["categorical"][k] for k in SPEC.user_categorical]
    # one decoder: a window's parts concatenate, and a subset of requests is taken whole
    taken = columns.take([3, 1])
    assert taken.request_ids == [columns.request_ids[3], columns.request_ids[1]]
    assert taken.candidate_ids == columns.candidate_ids[columns.offsets[3] : columns.offsets[4]] + columns.candidate_ids[
        columns.offsets[1] : columns.offsets[2]
    ]


def test_statistics_at_a_requests_time_equal_a_brute_force_count_over_earlier_events(day):
    sim, tmp_path = day
    refs = list_batches(tmp_path)
    items = ItemStatistics()
    from freshtower.core.statistics import item_count_deltas

    items.apply(item_count_deltas([d for r in refs if (rows := read_statistics_rows(r)) is not None for d in item_count_deltas(rows)]))
    columns = all_ranking(tmp_path)
    counts = statistics_counts(columns, items)
    # the brute force: every impression (per shown item) and every click within the join window, from the simulator's truth
    user, item, category, time, clicked = [], [], [], [], []
    for request in sim.requests(0):
        for slot, i in enumerate(request.shown.tolist()):
            for is_click, t in ((False, request.ts_ms), (True, int(request.click_ts_ms[slot]))):
                if is_click and not (request.clicked[slot] and t - request.ts_ms <= SETTINGS.join_window_ms):
                    continue
                user.append(sim.user_id(request.user))
                item.append(sim.item_id(i))
                category.append(sim.item_category(i))
                time.append(t)
                clicked.append(is_click)
    user, item, category = np.array(user), np.array(item), np.array(category)
    time, clicked = np.array(time), np.array(clicked)
    rng = np.random.default_rng(0)
    checked = nonzero = 0
    for r in rng.choice(len(columns), size=120, replace=False).tolist():
        t = int(columns.event_time_ms[r])
        (h0, h1), (d0, d1) = hour_window(t), day_window(t)
        in_hour, in_day = (time >= h0) & (time < h1), (time >= d0) & (time < d1)
        mine = user == columns.user_ids[r]
        for j in range(columns.offsets[r], columns.offsets[r + 1]):
            same_item, same_category = item == columns.candidate_ids[j], mine & (category == columns.categories[j])
            expected = [
                np.sum(same_item & in_hour & ~clicked), np.sum(same_item & in_hour & clicked),
                np.sum(same_item & in_day & ~clicked), np.sum(same_item & in_day & clicked),
                np.sum(same_category & in_hour & ~clicked), np.sum(same_category & in_hour & clicked),
                np.sum(same_category & in_day & ~clicked), np.sum(same_category & in_day & clicked),
                np.sum(mine & in_hour & clicked),
            ]
            assert counts[j].tolist() == expected, (columns.request_ids[r], columns.candidate_ids[j], t)
            checked += 1
            nonzero += bool(counts[j, 4:].any())
    assert checked > 500 and nonzero > checked / 4  # the counts are not trivially zero


def test_a_restarted_sink_rebuilds_its_statistics_from_the_rows_it_wrote(tmp_path):
    sim = simulator()
    events = [e for e in raw_events(sim, [0], partitions=1)]
    end = sim.day_start_ms(1) + 2 * SETTINGS.join_window_ms
    straight = tmp_path / "straight"
    run_join(events, 0, BatchSink(straight, "w", new_estimator(), partition=0, emitter=new_emitter()), end_ms=end)

    restarted = tmp_path / "restarted"
    cut = sim.day_start_ms(0) + 14 * HOUR_MS
    core = run_join([e for e in events if _ts(e) < cut], 0, BatchSink(restarted, "w", new_estimator(), partition=0, emitter=new_emitter()))
    # a new worker: the join state survives (the changelog), the emitter's counters do not
    sink = BatchSink.open(restarted, "w", new_estimator, {}, core.open_from_ms, partition=0, emitter=new_emitter())
    run_join([e for e in events if _ts(e) >= cut], 0, sink, core=core, end_ms=end)

    a, b = all_ranking(straight), all_ranking(restarted)
    assert a.request_ids == b.request_ids and len(a) > 1000
    np.testing.assert_array_equal(a.user_counts, b.user_counts)
    assert a.user_counts.sum() > 0


def _ts(event) -> int:
    import json

    return json.loads(event.value)["ts"]


def test_a_stream_without_rank_logs_writes_no_ranking_samples(tmp_path):
    sim = simulator()
    events = [e for e in raw_events(sim, [0], partitions=1) if e.topic != "rank-logs"]
    run_join(events, 0, BatchSink(tmp_path, "w", new_estimator(), partition=0, emitter=new_emitter()), end_ms=sim.day_start_ms(1) + HOUR_MS)
    refs = list_batches(tmp_path)
    assert refs and all("ranking_samples" not in r.manifest.extras for r in refs)
    assert all(len(read_ranking_samples(r, SPEC)) == 0 for r in refs)
    assert sum(read_statistics_rows(r) is not None for r in refs) > 0  # the statistics still count the impressions


def test_a_corrupt_ranking_file_is_named(day, tmp_path):
    import shutil

    shutil.copytree(day[1], tmp_path / "copy")
    ref = next(r for r in list_batches(tmp_path / "copy") if "ranking_samples" in r.manifest.extras)
    path = ref.manifest_path.parent / ref.manifest.extras["ranking_samples"]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    from freshtower.core.batches import BatchFormatError

    with pytest.raises(BatchFormatError, match="ranking"):
        read_ranking_samples(ref, SPEC)


assert MINUTE_MS == 60_000
