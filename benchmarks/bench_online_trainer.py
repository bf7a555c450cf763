"""Online trainer throughput: user-ID-only listwise steps with in-batch
negatives over a large user table, from decoded samples in memory (the
trainer's maths) and end to end from TFRecord batch files (decode in a
background process + training), beside the raw decode rate of the same files.

    python benchmarks/bench_online_trainer.py --users 1000000 --dim 64 --batch 1024
    python benchmarks/bench_online_trainer.py --item-exponent 0   # every in-batch item distinct
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from freshtower.trainer.artifacts import full_models_dir, new_estimator, new_model, save_full_model
from freshtower.trainer.online import OnlineTrainer, decode_for_training

from freshtower.app.simulator import synthetic_click_samples
from freshtower.core.batches import FeatureSpec, list_batches, write_batch
from freshtower.core.contracts import TrainingRecord
from freshtower.core.settings import load_settings


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=400_000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "sparse_adam"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--hard-fraction", type=float, default=None, help="weight of the hard-negative part (default: the setting's, 0.5); 0: in-batch only")
    parser.add_argument(
        "--item-exponent", type=float, default=1.3,
        help="Zipf exponent of clicked items (default 1.3); 0: uniform, so nearly every in-batch item is distinct (the worst case)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data_dir = Path(tempfile.mkdtemp(prefix="bench-online-"))
    settings = load_settings(
        data_dir=data_dir,
        model={"id_dim": args.dim, "output_dim": args.dim},
        vocabulary={"user_min_count": 1},
        training={
            "batch_size": args.batch,
            "mode": "listwise",
            "online_optimizer": args.optimizer,
            "checkpoint_every_seconds": 1e9,
            "positive_resampling": {"enabled": False},
            **({} if args.hard_fraction is None else {"negatives": {"hard_fraction": args.hard_fraction}}),
        },
    )
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"settings: users={args.users} items={args.items} dim={args.dim} batch={args.batch} samples={args.samples} "
          f"files={args.files} loss=listwise in-batch + logQ, hard_fraction={settings.training.negatives.hard_fraction}, "
          f"optimizer={args.optimizer} item_exponent={args.item_exponent or 'uniform'}")

    start_ms = 1_790_000_000_000 - 1_790_000_000_000 % 60_000
    started = time.perf_counter()
    model = new_model(settings)
    model.user_ids.observe([f"u{i}" for i in range(args.users)], day=0)
    items = [f"i{i}" for i in range(args.items)]
    model.item_ids.observe(items, day=0)
    model.catalogue.update(items, {"category": [f"c{i % 20}" for i in range(args.items)]}, day=0)
    model.sync_tables()
    estimator = new_estimator(settings)
    save_full_model(full_models_dir(settings), "2026-09-21", model, estimator, {}, TrainingRecord(
        parent=None, from_scratch=True, data_start_ms=start_ms - 60_000, data_end_ms=start_ms, newest_click_event_time_ms=None,
        holdout_start_ms=start_ms, holdout_end_ms=start_ms, metrics={}, lineage=[], config=settings.as_record()))
    print(f"setup: full model with {args.users} users x {args.dim} written in {time.perf_counter() - started:.1f} s")

    per_file = args.samples // args.files
    started = time.perf_counter()
    for f in range(args.files):
        samples = synthetic_click_samples(
            per_file, args.users, args.items, start_ms + f * 60_000, 60_000, seed=f, item_exponent=args.item_exponent or None
        )
        write_batch(settings.batches_dir, start_ms + f * 60_000, start_ms + (f + 1) * 60_000, samples)
    refs = list_batches(settings.batches_dir)
    print(f"setup: {len(refs)} batch files x {per_file} clicks written in {time.perf_counter() - started:.1f} s")

    spec = FeatureSpec.from_model(settings.model)
    started, cpu = time.perf_counter(), time.process_time()
    decoded = [decode_for_training(r, spec) for r in refs]  # what the trainer's prefetch process hands over
    decode_seconds, decode_cpu = time.perf_counter() - started, time.process_time() - cpu
    total = sum(len(d) for d in decoded)
    print(f"decode + ID fingerprints only (one process): {total / decode_seconds:,.0f} samples/s, {total / decode_cpu:,.0f} per CPU-second")
    # The in-batch softmax has one column per distinct item (see trainer/losses.py), so its cost follows this.
    distinct = [len(set(d.item_ids[s : s + args.batch])) for d in decoded for s in range(0, len(d) - args.batch + 1, args.batch)]
    print(f"distinct items per minibatch of {args.batch}: mean {np.mean(distinct):.0f}, min {min(distinct)}, max {max(distinct)}")

    trainer = OnlineTrainer.start(settings)
    trainer.learn_batch(refs[0], decoded[0])  # warm-up, not timed
    started, cpu = time.perf_counter(), time.process_time()
    for ref, samples in zip(refs[1:], decoded[1:]):
        trainer.learn_batch(ref, samples)
    seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu
    in_memory = sum(len(d) for d in decoded[1:]) / seconds
    in_memory_cpu = sum(len(d) for d in decoded[1:]) / train_cpu
    print(f"online trainer, decoded samples in memory: {in_memory:,.0f} samples/s ({seconds:.1f} s), "
          f"{in_memory_cpu:,.0f} per CPU-second of the process")

    trainer = OnlineTrainer.start(settings)  # fresh fork: position back at the first batch
    finished: list[tuple[float, float, int]] = []  # (time, CPU time of this process, samples) as each file is learnt
    started = time.perf_counter()
    stats = trainer.run(
        prefetch=True, on_batch=lambda report: finished.append((time.perf_counter(), time.process_time(), report.samples))
    )
    seconds = time.perf_counter() - started
    # Steady state: from the first file learnt to the last (the decode process is up and ahead);
    # the total adds starting that process, the first file's decode and the final checkpoint.
    steady = sum(n for _, _, n in finished[1:]) / (finished[-1][0] - finished[0][0])
    steady_cpu = sum(n for _, _, n in finished[1:]) / (finished[-1][1] - finished[0][1])
    print(f"online trainer, end to end from files (decode prefetched in a 2nd process): {steady:,.0f} samples/s steady; "
          f"{stats.samples / seconds:,.0f} samples/s over the whole run ({stats.batches} files, {seconds:.1f} s incl. "
          f"{finished[0][0] - started:.1f} s to the first file learnt and the final checkpoint)")
    print(f"  steady: {steady / in_memory:.2f} of the in-memory rate; the trainer process learnt {steady_cpu:,.0f} samples "
          f"per CPU-second of its own ({steady_cpu / in_memory_cpu:.2f} of in memory: the hand-over's cost)")
    # On a machine with a free core for each process, end to end runs at the slower of the two
    # processes; their per-CPU-second rates are what a loaded machine cannot blur.
    bound = min(total / decode_cpu, steady_cpu)
    print(f"  per CPU-second, decode {total / decode_cpu:,.0f} vs learning {steady_cpu:,.0f}: one core each gives "
          f"~{bound:,.0f} samples/s, {bound / in_memory_cpu:.2f} of the in-memory rate at these threads")
    started = time.perf_counter()
    trainer.checkpoint()
    print(f"checkpoint of {args.users} rows: {time.perf_counter() - started:.2f} s, "
          f"{(settings.online_dir / 'checkpoint.pt').stat().st_size / 2**20:.0f} MiB")
    table_mib = trainer.model.user_tower.id_embedding.numel() * 4 / 2**20
    print(f"memory: user table {table_mib:.0f} MiB, peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
