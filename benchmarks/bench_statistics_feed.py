"""What the statistics snapshot adds to each embeddings release: the
publisher's side (count one more minute of statistics rows, take the
snapshot, encode ``statistics.npz``) and the service's (read the file,
build the item statistics' hash table), beside the nearest limits in the
same run: ``np.save``/``np.load`` of the same arrays uncompressed (the
file's own I/O, no counting) and a ``np.unique`` over one day's keys (the
least a from-scratch recount sorts).

    python benchmarks/bench_statistics_feed.py --users 200000 --items 200000 --rows-per-minute 2000

A seeded synthetic day of statistics rows (impressions and clicks, users
and items Zipf-like, ``--categories`` item categories) is counted minute by
minute through the production counters (``ItemStatistics``,
``UserStatistics``: what ``StatisticsFeed`` holds), then ``--releases``
releases are timed, each after one more minute of rows, the way the
publisher builds them. Memory: the counters' buckets and the file's bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time

import numpy as np
from freshtower.publisher.prerank_scorer import ItemStatisticsIndex
from freshtower.publisher.statistics_feed import StatisticsSnapshots, statistics_bytes

from freshtower.core.eventtime import MINUTE_MS
from freshtower.core.statistics import Interactions, ItemStatistics, UserStatistics, item_count_deltas

T0 = 1_795_132_800_000  # a UTC midnight


def minute_rows(rng, args, minute: int) -> Interactions:
    n = args.rows_per_minute
    users = np.minimum(rng.zipf(1.3, n), args.users) - 1
    items = np.minimum(rng.zipf(1.2, n), args.items) - 1
    return Interactions(
        [f"u{k}" for k in users.tolist()],
        [f"i{k}" for k in items.tolist()],
        [f"c{k % args.categories}" for k in items.tolist()],
        T0 + minute * MINUTE_MS + rng.integers(0, MINUTE_MS, n),
        rng.random(n) < 0.05,
    )


def count(items: ItemStatistics, users: UserStatistics, rows: Interactions) -> None:
    items.apply(item_count_deltas(rows))
    users.add(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--categories", type=int, default=50)
    parser.add_argument("--rows-per-minute", type=int, default=2_000)
    parser.add_argument("--minutes", type=int, default=24 * 60, help="of rows counted before timing")
    parser.add_argument("--releases", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    items, users = ItemStatistics(), UserStatistics()
    started = time.perf_counter()
    for minute in range(args.minutes):
        count(items, users, minute_rows(rng, args, minute))
    print(f"counted {args.minutes} minutes x {args.rows_per_minute} rows in {time.perf_counter() - started:.1f} s; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")

    timings = {k: [] for k in ("count_minute", "snapshot", "encode", "load", "index", "raw_save", "raw_load")}
    size = keys = 0
    for release in range(args.releases):
        minute = args.minutes + release
        rows = minute_rows(rng, args, minute)
        t = time.perf_counter()
        count(items, users, rows)
        timings["count_minute"].append(time.perf_counter() - t)
        as_of = T0 + (minute + 1) * MINUTE_MS
        t = time.perf_counter()
        by_category, by_user = users.snapshots(as_of)
        snapshots = StatisticsSnapshots(as_of, items.snapshot(as_of), by_category, by_user)
        items.advance(as_of)
        users.advance(as_of)
        timings["snapshot"].append(time.perf_counter() - t)
        t = time.perf_counter()
        data = statistics_bytes(snapshots)
        timings["encode"].append(time.perf_counter() - t)
        size, keys = len(data), snapshots.keys
        t = time.perf_counter()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            loaded = {name: npz[name] for name in npz.files}
        timings["load"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ItemStatisticsIndex(snapshots.items)
        timings["index"].append(time.perf_counter() - t)
        # the limits: the same arrays saved and loaded uncompressed, no counting
        t = time.perf_counter()
        raw = io.BytesIO()
        for name in sorted(loaded):
            np.save(raw, loaded[name])
        timings["raw_save"].append(time.perf_counter() - t)
        t = time.perf_counter()
        raw.seek(0)
        for _ in loaded:
            np.load(raw)
        timings["raw_load"].append(time.perf_counter() - t)

    every_key = np.concatenate([snapshots.items.keys, snapshots.by_category.keys, snapshots.by_user.keys])
    t = time.perf_counter()
    np.unique(every_key)
    unique_s = time.perf_counter() - t
    median = {k: 1000 * float(np.median(v)) for k, v in timings.items()}
    print(f"snapshot: {len(snapshots.items.keys):,} items, {len(snapshots.by_category.keys):,} (user, category) pairs, "
          f"{len(snapshots.by_user.keys):,} users = {keys:,} keys; statistics.npz {size / 1e6:.1f} MB ({size / max(keys, 1):.0f} B per key)")
    print(f"minute buckets {items._counts.buckets()[0]}, hour buckets {items._counts.buckets()[1]} (items)")
    print(f"publisher per release (median of {args.releases}): count one minute {median['count_minute']:.1f} ms, "
          f"snapshot {median['snapshot']:.1f} ms, encode {median['encode']:.1f} ms "
          f"(limit: np.save of the same arrays {median['raw_save']:.1f} ms; np.unique of every key {1000 * unique_s:.1f} ms)")
    print(f"service per release: load {median['load']:.1f} ms (limit: np.load {median['raw_load']:.1f} ms), "
          f"item statistics hash table {median['index']:.1f} ms")


if __name__ == "__main__":
    main()
