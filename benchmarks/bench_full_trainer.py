"""Daily full trainer throughput: one simulated day of click batches, read
in time order, shuffled through shard files, trained one epoch on every
parameter; prints the read rate, the training rate and the evaluation time.

    python benchmarks/bench_full_trainer.py --users 200000 --items 20000 --samples 300000
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from freshtower.trainer.full import train_full

from freshtower.app.simulator import synthetic_click_samples
from freshtower.core.batches import write_batch
from freshtower.core.settings import load_settings

DAY = "2026-09-21"
DAY_START_MS = 1_789_948_800_000  # 2026-09-21 00:00 UTC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=300_000)
    parser.add_argument("--files", type=int, default=96, help="batch files over the day")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--mode", default="listwise", choices=["listwise", "pointwise", "pairwise"])
    parser.add_argument("--easy", default="in_batch", choices=["in_batch", "catalogue"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-full-"))
    settings = load_settings(
        data_dir=data_dir,
        vocabulary={"user_min_count": 1},
        training={"batch_size": args.batch, "mode": args.mode, "negatives": {"easy_source": args.easy}},
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"settings: users={args.users} items={args.items} clicks={args.samples} files={args.files} batch={args.batch} "
          f"mode={args.mode} easy={args.easy} hard_fraction={settings.training.negatives.hard_fraction} "
          f"positive re-sampling={settings.training.positive_resampling.enabled}")
    per_file = args.samples // args.files
    span = 86_400_000 // args.files
    started = time.perf_counter()
    for f in range(args.files):
        start = DAY_START_MS + f * span
        write_batch(settings.batches_dir, start, start + span,
                    synthetic_click_samples(per_file, args.users, args.items, start, span, seed=f))
    print(f"setup: {args.files} files x {per_file} clicks in {time.perf_counter() - started:.1f} s")

    phases: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        phases.setdefault(phase + "_start", time.perf_counter())
        phases[phase + "_end"] = time.perf_counter()

    started = time.perf_counter()
    result = train_full(settings, DAY, from_scratch=True, progress=progress)
    total = time.perf_counter() - started
    metrics = result.metrics
    read_seconds = phases["read_end"] - phases["read_start"]
    print(f"pass 1 (read, time order, shard scatter): {args.samples / read_seconds:,.0f} records/s")
    print(f"pass 2 (shuffled, one epoch, all parameters): {result.samples_per_second:,.0f} samples/s "
          f"({result.samples:,} samples after re-sampling, {result.train_seconds:.1f} s)")
    print(f"holdout evaluation ({metrics['users']:,} users x {metrics['items']:,} items, exact + faiss): {metrics['seconds']:.2f} s; "
          f"recall@50 exact {metrics['exact']['recall@50']:.4f} faiss {metrics['faiss']['recall@50']:.4f}")
    print(f"whole run incl. artifact write: {total:.1f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
