"""Statistics features against a brute-force count written from the module's
definitions: last hour = [M - 1 h, M), last day = [H - 23 h, M), with M and
H the starts of the request's minute and hour."""

from __future__ import annotations

import random

import numpy as np
import pytest

from freshtower.core.fingerprints import fingerprint_strings
from freshtower.core.statistics import (
    COUNT_COLUMNS,
    DAY,
    FEATURE_NAMES,
    HOUR,
    Interactions,
    ItemStatistics,
    UserStatistics,
    WindowedCounts,
    effective_time_ms,
    encode_statistics,
    item_count_deltas,
    user_category_keys,
)

MIN = 60_000
HR = 3_600_000
DAY0 = 20_000 * 24 * HR  # a UTC midnight


def brute_force(events, t, user, item, category):
    """The nine COUNT_COLUMNS for (user, item of category) at a request at t,
    counted event by event. events: (ts, user, item, category, clicked)."""
    minute, hour = t - t % MIN, t - t % HR
    in_hour = lambda s: minute - HR <= s < minute  # noqa: E731
    in_day = lambda s: hour - 23 * HR <= s < minute  # noqa: E731
    row = [0] * 9
    for ts, u, i, c, clicked in events:
        for window, inside in ((0, in_hour(ts)), (1, in_day(ts))):
            if not inside:
                continue
            if i == item:
                row[2 * window + clicked] += 1
            if u == user and c == category:
                row[4 + 2 * window + clicked] += 1
        if u == user and clicked and in_hour(ts):
            row[8] += 1
    return row


def random_events(seed, n=1500, users=5, items=8, span_hours=30):
    """Events on a 30 s grid, a quarter of them exactly on minute or hour
    boundaries or one millisecond before: ties land on every edge."""
    rng = random.Random(seed)
    category_of = {f"i{k}": f"c{k % 3}" for k in range(items)}
    events = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.1:
            ts = DAY0 + rng.randrange(span_hours) * HR  # on an hour boundary
        elif kind < 0.2:
            ts = DAY0 + rng.randrange(span_hours * 60) * MIN - 1  # a millisecond before a minute
        elif kind < 0.25:
            ts = DAY0 + rng.randrange(span_hours * 60) * MIN  # on a minute boundary
        else:
            ts = DAY0 + rng.randrange(span_hours * 120) * 30_000 + rng.choice((0, 0, 1, 29_999))
        item = f"i{rng.randrange(items)}"
        events.append((max(ts, 0), f"u{rng.randrange(users)}", item, category_of[item], rng.random() < 0.3))
    events.sort()
    requests = sorted(
        DAY0 + rng.randrange(span_hours * 60) * MIN + rng.choice((0, 0, 1, 30_000, 59_999, -1)) for _ in range(40)
    )
    return events, requests, category_of


def as_interactions(events):
    return Interactions(
        [e[1] for e in events],
        [e[2] for e in events],
        [e[3] for e in events],
        np.array([e[0] for e in events], dtype=np.int64),
        np.array([e[4] for e in events], dtype=bool),
    )


@pytest.mark.parametrize("seed", range(5))
def test_statistics_as_of_each_request_equal_a_brute_force_count_over_earlier_events(seed):
    events, requests, category_of = random_events(seed)
    items_stats, users_stats = ItemStatistics(), UserStatistics()
    fed = 0
    for t in requests:
        # feed events up to five minutes past the request: they must not count
        end = fed
        while end < len(events) and events[end][0] < t + 5 * MIN:
            end += 1
        if end > fed:
            batch = as_interactions(events[fed:end])
            items_stats.apply(item_count_deltas(batch))
            users_stats.add(batch)
            fed = end
        user = f"u{t % 5}"
        item_ids = sorted(category_of)
        categories = [category_of[i] for i in item_ids]
        got = np.hstack([items_stats.counts(item_ids, t), users_stats.counts([user] * len(item_ids), categories, t)])
        expected = [brute_force(events, t, user, i, category_of[i]) for i in item_ids]
        assert got.tolist() == expected, f"request at {t - DAY0} ms after day 0"
        # the snapshots that are published for serving say the same
        by_category, by_user = users_stats.snapshots(t)
        from_snapshots = np.hstack([
            items_stats.snapshot(t).lookup(fingerprint_strings(item_ids)).reshape(-1, 4),
            by_category.lookup(user_category_keys([user] * len(item_ids), categories)).reshape(-1, 4),
            by_user.lookup(fingerprint_strings([user] * len(item_ids)))[:, HOUR],
        ])
        assert np.array_equal(from_snapshots, got)
        # later requests never ask about earlier times: memory may shrink
        items_stats.advance(t)
        users_stats.advance(t)


@pytest.mark.parametrize("partitions", [2, 3])
def test_item_statistics_from_every_partitions_deltas_in_any_order_equal_the_count_over_all_events(partitions):
    events, requests, category_of = random_events(seed=11)
    by_partition = [[e for e in events if int(e[1][1:]) % partitions == p] for p in range(partitions)]
    deltas = []
    for share in by_partition:  # each partition emits its deltas window by window (10-minute micro-batches)
        for start in range(0, len(share), 50):
            deltas.extend(item_count_deltas(as_interactions(share[start : start + 50])))
    forward, shuffled = ItemStatistics(), ItemStatistics()
    forward.apply(deltas)
    order = list(deltas)
    random.Random(3).shuffle(order)
    shuffled.apply(order)
    item_ids = sorted(category_of)
    for t in requests[:15]:
        expected = [brute_force(events, t, "nobody", i, "none")[:4] for i in item_ids]
        assert forward.counts(item_ids, t).tolist() == expected
        assert np.array_equal(shuffled.counts(item_ids, t), forward.counts(item_ids, t))
    # merged deltas are canonical: the same whatever the split
    merged = item_count_deltas(deltas)
    direct = item_count_deltas(as_interactions(events))
    assert [(d.minute_ms, d.item_ids, d.impressions.tolist(), d.clicks.tolist()) for d in merged] == [
        (d.minute_ms, d.item_ids, d.impressions.tolist(), d.clicks.tolist()) for d in direct
    ]


def test_boundaries_by_hand():
    # request at 10:00:30 on day 1; M = 10:00, H = 10:00
    t = DAY0 + 24 * HR + 10 * HR + 30_000
    times = {
        "10:00:00.000 (request's own minute)": DAY0 + 34 * HR,
        "09:59:59.999": DAY0 + 34 * HR - 1,
        "09:00:00.000 (first of the hour)": DAY0 + 33 * HR,
        "08:59:59.999 (day only)": DAY0 + 33 * HR - 1,
        "day 0 11:00:00.000 (H - 23 h, first of the day)": DAY0 + 11 * HR,
        "day 0 10:59:59.999 (outside)": DAY0 + 11 * HR - 1,
    }
    counts = WindowedCounts(channels=1)
    key = fingerprint_strings(["i"])
    for ts in times.values():
        counts.add(key, np.array([ts]), np.array([[1]]))
    hour, day = counts.snapshot(t).lookup(key)[0, :, 0].tolist()
    assert (hour, day) == (2, 4)  # hour: 09:59:59.999, 09:00; day: those and 08:59:59.999, day 0 11:00
    # at 10:01:00 the 10:00 event counts; 09:00:00.000 is now an hour and a minute old
    hour, day = counts.snapshot(t + 30_000).lookup(key)[0, :, 0].tolist()
    assert (hour, day) == (2, 5)


def test_a_request_in_the_first_minute_of_an_hour_counts_23_whole_hours_for_the_day():
    counts = WindowedCounts(channels=1)
    key = fingerprint_strings(["i"])
    counts.add(key, np.array([DAY0 + 23 * HR - 1]), np.array([[1]]))  # day 0, 22:59:59.999
    counts.add(key, np.array([DAY0 + 24 * HR - 1]), np.array([[1]]))  # day 0, 23:59:59.999
    # at day 1 00:00 the day window is [day 0 01:00, day 1 00:00): both count
    assert counts.snapshot(DAY0 + 24 * HR).lookup(key)[0, DAY, 0] == 2
    assert counts.snapshot(DAY0 + 46 * HR).lookup(key)[0, DAY, 0] == 1  # day 1 22:00: starts at day 0 23:00
    assert counts.snapshot(DAY0 + 47 * HR).lookup(key)[0, DAY, 0] == 0  # day 1 23:00: starts at day 1 00:00


def test_advance_bounds_the_buckets_and_refuses_earlier_queries():
    counts = WindowedCounts(channels=2)
    keys = fingerprint_strings(["a", "b"])
    for minute in range(3 * 24 * 60):  # three days, one event per key per minute
        counts.add(keys, np.full(2, DAY0 + minute * MIN), np.array([[1, 0], [0, 1]]))
        counts.advance(DAY0 + minute * MIN)
    minutes, hours = counts.buckets()
    assert minutes <= 61 and hours <= 25  # the hour's minutes, the day's hours, and the one being filled
    now = DAY0 + 3 * 24 * HR - MIN
    snapshot = counts.snapshot(now)
    # as of day 2 23:59: hour window [22:59, 23:59) = 60 minutes; day window
    # [H - 23 h, M) = [day 2 00:00, 23:59) = 23 whole hours and 59 minutes
    assert snapshot.lookup(keys)[:, HOUR].tolist() == [[60, 0], [0, 60]]
    assert snapshot.lookup(keys)[:, DAY].tolist() == [[23 * 60 + 59, 0], [0, 23 * 60 + 59]]
    with pytest.raises(ValueError, match="precede the floor"):
        counts.snapshot(now - 2 * MIN)
    # an addition older than any answerable window is dropped (and counted), one that still
    # counts in a day window goes to its hour bucket
    counts.add(keys[:1], np.array([DAY0]), np.array([[1, 0]]))
    counts.add(keys[:1], np.array([now - 5 * HR]), np.array([[1, 0]]))
    assert counts.dropped == 1
    assert counts.snapshot(now).lookup(keys[:1])[0, DAY, 0] == 23 * 60 + 59 + 1


def test_late_events_count_at_the_window_they_were_assigned():
    # a click at 10:00:50 that the stream put into the 10:02 window counts from 10:03 on
    ts, window = DAY0 + 10 * HR + 50_000, DAY0 + 10 * HR + 2 * MIN
    at = effective_time_ms(np.array([ts]), np.array([window]))
    stats = UserStatistics()
    stats.add(Interactions(["u"], ["i"], ["c"], at, np.array([True])))
    assert stats.counts(["u"], ["c"], DAY0 + 10 * HR + 2 * MIN + 59_999)[0, 4] == 0
    assert stats.counts(["u"], ["c"], DAY0 + 10 * HR + 3 * MIN)[0].tolist() == [0, 1, 0, 1, 1]


def test_interactions_with_ragged_columns_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        Interactions(["u"], ["i", "j"], ["c"], np.array([0]), np.array([False]))


def test_encoding_by_hand():
    counts = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
            [10, 2, 40, 30, 3, 1, 5, 4, 7],
        ]
    )
    features = encode_statistics(counts, ctr_prior=0.05, prior_strength=20.0)
    assert features.shape == (2, len(FEATURE_NAMES)) and features.dtype == np.float32
    assert len(FEATURE_NAMES) == len(COUNT_COLUMNS) + 4
    # no counts: log1p 0 = 0, every CTR is the prior 1 / 20 = 0.05
    assert features[0].tolist() == pytest.approx([0.0] * 9 + [0.05] * 4)
    # item 1h (2 + 1) / (10 + 20) = 0.1; item 1d (30 + 1) / (40 + 20) = 0.516667;
    # user-category 1h (1 + 1) / (3 + 20) = 0.086957; 1d (4 + 1) / (5 + 20) = 0.2
    assert features[1, 9:].tolist() == pytest.approx([0.1, 31 / 60, 2 / 23, 0.2], abs=1e-6)
    assert features[1, :9].tolist() == pytest.approx(np.log1p(counts[1]).tolist(), abs=1e-6)
    # more clicks than impressions in a window (the impression fell before it) clips at 1
    assert encode_statistics(np.array([[0, 50, 0, 0, 0, 0, 0, 0, 0]]), 0.05, 20.0)[0, 9] == 1.0
    buffer = np.full((2, 13), np.nan, dtype=np.float32)
    assert encode_statistics(counts, 0.05, 20.0, out=buffer) is buffer
    assert np.array_equal(buffer, features)
    with pytest.raises(ValueError, match=r"\(n, 9\)"):
        encode_statistics(np.zeros((2, 8)), 0.05, 20.0)
