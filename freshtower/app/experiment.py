"""``freshtower experiment``: what fresh user embeddings are worth.

For each data set (the simulator's days, MovieLens-100k's first days) it
makes the batches, through Kafka and a real streams worker
(``streamed_batches``, the default) or joined in process (``direct``),
then replays the four arms on them (``experiment_arms``: daily full only,
incremental only, full + incremental published every 30 minutes or every
minute) and reports next-hour Recall@K and click -> serving freshness as a
table, ``results.json`` and a PNG.

``run_experiment`` is the whole command behind one typed
``ExperimentOptions``; the CLI parses, calls it and prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from freshtower.app import movielens
from freshtower.app.experiment_arms import ArmResult, run_arms
from freshtower.core.eventtime import HOUR_MS
from freshtower.core.settings import Settings

DATA_SETS = ("simulator", "movielens", "both")
THROUGH = ("kafka", "direct")


@dataclass(frozen=True)
class ExperimentOptions:
    """What ``freshtower experiment`` runs (its command-line options)."""

    out: Path = Path("freshtower-experiment")  # work directory: batches, models, results.json, recall.png
    data: str = "both"  # simulator, movielens or both
    days: int = 3  # simulated days
    movielens_days: int = 60  # MovieLens days replayed, from its first rating
    users: int = 2000
    items: int = 1000
    requests_per_day: int = 20000
    seed: int = 0
    through: str = "kafka"  # kafka: a real streams worker cuts the batches; direct: joined in process
    exclude_seen: bool = False  # score recall without the items each user clicked in earlier hours

    def __post_init__(self):
        if self.data not in DATA_SETS:
            raise ValueError(f"--data must be simulator, movielens or both, got {self.data!r}")
        if self.through not in THROUGH:
            raise ValueError(f"--through must be kafka or direct, got {self.through!r}")

    @property
    def data_sets(self) -> tuple[str, ...]:
        return ("simulator", "movielens") if self.data == "both" else (self.data,)


@dataclass
class ExperimentResult:
    rows: list[tuple[str, ArmResult]]  # (data set, arm result)
    table: str  # the Markdown table
    results_path: Path
    plot_path: Path | None  # None without matplotlib


def experiment_settings(settings: Settings) -> Settings:
    """The experiment's choices where the user did not set them: one
    partition per topic (one batch file per minute window, not four: the
    experiment's streams are small and four days are 5,760 windows), and
    2^16 frequency buckets (the catalogues are 500-1,682 items; the
    snapshot saved beside every batch stays small)."""
    from freshtower.app.pipeline import unless_set

    return settings.model_copy(
        update={"streams": unless_set(settings.streams, partitions=1), "frequency": unless_set(settings.frequency, buckets=1 << 16)}
    )


def run_experiment(settings: Settings, options: ExperimentOptions, report: Callable[[str], None] = print) -> ExperimentResult:
    """Every data set's batches, then its arms; the results written under
    ``options.out``. Raises ``FileExistsError`` when ``out`` is not empty,
    and the supervisor's ``PartDied`` / ``Stalled`` when the streams worker
    (``--through kafka``) dies or does not finish."""
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: pass a new --out directory")
    settings = experiment_settings(settings)
    rows: list[tuple[str, ArmResult]] = []
    streamed: dict[str, dict] = {}
    for data in options.data_sets:
        work = out / data
        work.mkdir(parents=True)
        prepare = _simulator_batches if data == "simulator" else _movielens_batches
        label, data_settings, batches, figures = prepare(settings, options, work, report)
        if figures is not None:
            streamed[label] = figures
        arms = run_arms(data_settings, work, batches, report=report, exclude_seen=options.exclude_seen)
        rows += [(label, r) for r in arms]
    results = [
        {"data": d, "arm": r.arm, "recall": r.recall, "units": r.units, "through": options.through, "exclude_seen": options.exclude_seen,
         "streams": streamed.get(d), "freshness_p50_s": r.freshness_percentile(50), "freshness_p99_s": r.freshness_percentile(99),
         "hourly": r.hourly}
        for d, r in rows
    ]
    results_path = out / "results.json"
    results_path.write_text(json.dumps(results, indent=1))
    return ExperimentResult(rows, format_table(rows), results_path, plot(rows, out / "recall.png"))


def _simulator_batches(settings: Settings, options: ExperimentOptions, work: Path, report) -> tuple[str, Settings, Path, dict | None]:
    from freshtower.app.event_log import simulated_start_day
    from freshtower.app.simulator import Simulator, SimulatorConfig

    o = options
    # The days end at today's midnight (UTC): the streams worker dead-letters events ahead of the clock.
    start_day = simulated_start_day(datetime.now(UTC).date(), o.days)
    simulator = Simulator(SimulatorConfig(users=o.users, items=o.items, requests_per_day=o.requests_per_day, seed=o.seed, start_day=start_day))
    report(f"simulator: {o.days} days from {start_day}, {o.users:,} users, {o.items:,} items, {o.requests_per_day:,} requests/day")
    if o.through == "kafka":
        counts = simulator.write_events(work / "events.jsonl", range(o.days))
        return "simulator", settings, *_through_kafka(settings, work / "events.jsonl", counts, report)
    batches = work / "batches"
    simulator.write_batches(batches, range(o.days), settings.streams.window_seconds)
    return "simulator", settings, batches, None


def _movielens_batches(settings: Settings, options: ExperimentOptions, work: Path, report) -> tuple[str, Settings, Path, dict | None]:
    data_settings = movielens.with_features(settings)
    report(f"movielens-100k: first {options.movielens_days} days")
    if options.through == "kafka":
        counts = movielens.write_first_days(work / "events.jsonl", options.movielens_days)
        return "movielens-100k", data_settings, *_through_kafka(data_settings, work / "events.jsonl", counts, report)
    batches = work / "batches"
    windows = movielens.write_batches(batches, settings.streams.window_seconds, max_days=options.movielens_days)
    report(f"  {windows:,} batch windows")
    return "movielens-100k", data_settings, batches, None


def _through_kafka(settings: Settings, events_path: Path, counts: dict[str, int], report) -> tuple[Path, dict]:
    """The events through Kafka and a streams worker into batch files: their directory and the worker's figures."""
    from freshtower.app.streamed_batches import stream_to_batches

    report(f"  {sum(counts.values()):,} events ({', '.join(f'{n:,} {t}' for t, n in sorted(counts.items()))}) to Kafka")
    written, figures = stream_to_batches(settings, events_path, events_path.parent / "streamed", report=report)
    report(
        f"  streams worker: {figures.events_read:,} events read, {figures.records:,} samples in {figures.batches:,} batch files, "
        f"{figures.dead_letters} dead letters, {figures.late_records} late, join hit rate {figures.join_hit_rate}, {figures.seconds:.0f} s"
    )
    return written.batches_dir, figures.__dict__


def format_table(rows: list[tuple[str, ArmResult]], ks: tuple[int, ...] = (50, 100)) -> str:
    head = "| data | arm | " + " | ".join(f"next-hour Recall@{k}" for k in ks) + " | freshness p50 | freshness p99 | units |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for data, result in rows:
        recalls = " | ".join(f"{result.recall[k]:.4f}" for k in ks)
        lines.append(
            f"| {data} | {result.arm} | {recalls} | {_duration(result.freshness_percentile(50))} | "
            f"{_duration(result.freshness_percentile(99))} | {result.units:,} |"
        )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plot(rows: list[tuple[str, ArmResult]], path: Path) -> Path | None:
    """Recall@50 per hour, one line per arm, one panel per data set (PNG).
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    datasets = list(dict.fromkeys(d for d, _ in rows))
    figure, axes = plt.subplots(len(datasets), 1, figsize=(10, 3.5 * len(datasets)), squeeze=False)
    for axis, data in zip(axes[:, 0], datasets):
        for name, result in [(r.arm, r) for d, r in rows if d == data]:
            if not result.hourly:
                continue
            hours = np.array([h for h, _ in result.hourly], dtype=np.int64)
            values = np.array([v for _, v in result.hourly])
            window = min(24, len(values))  # a day's rolling mean: hours are noisy
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot((hours[window - 1 :] - hours[0]) / HOUR_MS, smooth, label=name)
        axis.set_title(f"{data}: next-hour Recall@50 (24-hour rolling mean)")
        axis.set_xlabel("hours since the first full release")
        axis.set_ylabel("Recall@50")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
