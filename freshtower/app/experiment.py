"""``freshtower experiment``: what fresh user embeddings are worth, with error bars.

For each data set it makes the batches (joined in process, ``direct``, the
default, or through Kafka and a real streams worker, ``kafka``), replays
the arms and the baselines on them (``experiment_arms``) and reports
next-hour Recall@K, the cold-start split and click -> serving freshness:

- the simulator: ``seeds`` worlds (seed 0, 1, ...) of a named world
  (``WORLDS``: ``large``, the default, or ``small``), each replayed by
  every arm; per arm the mean over seeds with a 95% Student-t interval,
  and the paired difference full+inc minus daily-full seed by seed;
- MovieLens-100k or the user's own events file (``--events``, the
  ``freshtower replay`` JSONL format, its features declared in the
  configuration's ``model`` section): one world, so the intervals are a
  percentile bootstrap over users (paired for the difference).

The statistics are ``experiment_stats``; ``experiment_report`` writes the
table, ``results.json`` and the PNG. ``run_experiment`` is the whole
command behind one typed ``ExperimentOptions``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from freshtower.app import movielens
from freshtower.app.experiment_arms import ARMS, MAIN_ARMS, ArmResult, run_arms
from freshtower.app.experiment_report import DataSetResult, format_tables, plot, results_json
from freshtower.core.settings import Settings

DATA_SETS = ("simulator", "movielens", "both", "events")
THROUGH = ("kafka", "direct")


@dataclass(frozen=True)
class World:
    """A named simulated world and the K it is scored at (K at most 1% of the catalogue where it is large)."""

    name: str
    days: int
    users: int
    items: int
    requests_per_day: int
    new_users_per_day: int
    new_items_per_day: int
    ks: tuple[int, int]


WORLDS = {
    # 20,000 items, 1% = 200; each day from day 1 brings 500 users and 1,000 items.
    "large": World("large", days=3, users=4000, items=20_000, requests_per_day=12_000, new_users_per_day=500,
                   new_items_per_day=1000, ks=(50, 200)),
    # The world earlier versions of the experiment ran: 500 items, no newcomers.
    "small": World("small", days=4, users=1000, items=500, requests_per_day=8000, new_users_per_day=0, new_items_per_day=0, ks=(50, 100)),
}


@dataclass(frozen=True)
class ExperimentOptions:
    """What ``freshtower experiment`` runs (its command-line options)."""

    out: Path = Path("freshtower-experiment")  # work directory: batches, models, results.json, recall.png
    data: str = "simulator"  # simulator, movielens, both (simulator and MovieLens) or events (``events``)
    world: str = "large"  # the simulator's named world (WORLDS)
    seeds: int = 5  # simulator worlds, seeds first_seed, first_seed + 1, ...
    first_seed: int = 0
    days: int | None = None  # simulated days (None: the world's); with ``events``: the file's first days (None: all)
    users: int | None = None  # None: the world's
    items: int | None = None
    requests_per_day: int | None = None
    events: Path | None = None  # the user's own log (replay JSONL); data must be "events"
    movielens_days: int = 60  # MovieLens days replayed, from its first rating
    through: str = "direct"  # direct: joined in process; kafka: a real streams worker cuts the batches
    exclude_seen: bool = False  # score recall without the items each user clicked in earlier hours
    # online releases also serve the items seen since their full model; None: as publisher.new_item_vectors says
    new_item_vectors: bool | None = None
    resamples: int = 1000  # bootstrap resamples (single-world data sets)
    arms: str = "main"  # main: daily-full and full+inc/1min; all: also incremental and full+inc/30min
    jobs: int = 2  # simulator seeds replayed at once, each in a worker process of its own (1: in this process)

    def __post_init__(self):
        if self.events is not None and self.data == "simulator":
            object.__setattr__(self, "data", "events")
        if self.data not in DATA_SETS:
            raise ValueError(f"--data must be one of {', '.join(DATA_SETS)}, got {self.data!r}")
        if (self.data == "events") != (self.events is not None):
            raise ValueError("--events FILE and --data events go together")
        if self.through not in THROUGH:
            raise ValueError(f"--through must be kafka or direct, got {self.through!r}")
        if self.world not in WORLDS:
            raise ValueError(f"--world must be one of {', '.join(WORLDS)}, got {self.world!r}")
        if self.arms not in ("main", "all"):
            raise ValueError(f"--arms must be main or all, got {self.arms!r}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if self.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {self.jobs}")

    @property
    def data_sets(self) -> tuple[str, ...]:
        return ("simulator", "movielens") if self.data == "both" else (self.data,)

    @property
    def simulated(self) -> World:
        """The world with the options' overrides."""
        w = WORLDS[self.world]
        return replace(
            w, days=self.days or w.days, users=self.users or w.users, items=self.items or w.items,
            requests_per_day=self.requests_per_day or w.requests_per_day,
        )


@dataclass
class ExperimentResult:
    data_sets: list[DataSetResult]
    table: str  # the Markdown tables
    results_path: Path
    plot_path: Path | None  # None without matplotlib
    seconds: float


# Minibatch of the experiment's models where the user set none: a simulated day holds ~30,000 clicks, which at the
# trainer's 1,024 make 28 steps a day, too few for the towers to learn (day 0's model, next day's Recall@50, seed 0 of
# the large world: 0.005 at 1,024, 0.014 at 256, against 0.053 for the day's most popular items; docs/experiment.md).
EXPERIMENT_BATCH_SIZE = 256


def experiment_settings(settings: Settings) -> Settings:
    """The experiment's choices where the user did not set them: one
    partition per topic (one batch file per minute window, not four),
    2^16 frequency buckets (the snapshot saved beside every batch stays
    small), and minibatches of ``EXPERIMENT_BATCH_SIZE`` clicks (enough
    steps in a simulated day)."""
    from freshtower.app.pipeline import unless_set

    return settings.model_copy(
        update={
            "streams": unless_set(settings.streams, partitions=1),
            "frequency": unless_set(settings.frequency, buckets=1 << 16),
            "training": unless_set(settings.training, batch_size=EXPERIMENT_BATCH_SIZE),
        }
    )


def run_experiment(settings: Settings, options: ExperimentOptions, report: Callable[[str], None] = print) -> ExperimentResult:
    """Every data set's batches, then its arms; the results written under
    ``options.out``. Raises ``FileExistsError`` when ``out`` is not empty,
    ``event_schema.SchemaMismatch`` when an events file does not carry the
    configured features, and the supervisor's ``PartDied`` / ``Stalled``
    when the streams worker (``--through kafka``) dies or does not finish."""
    started = time.perf_counter()
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: pass a new --out directory")
    settings = experiment_settings(settings)
    if options.new_item_vectors is None:  # one source of truth: what the publisher's embeddings releases do
        options = replace(options, new_item_vectors=settings.publisher.new_item_vectors)
    results: list[DataSetResult] = []
    for data in options.data_sets:
        if data == "simulator":
            results.append(_simulator(settings, options, out / "simulator", report))
        else:
            results.append(_single_world(settings, options, data, out / data, report))
    out.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - started
    results_path = out / "results.json"
    results_path.write_text(json.dumps(results_json(results, options, seconds), indent=1))
    return ExperimentResult(results, format_tables(results), results_path, plot(results, out / "recall.png"), seconds)


def _simulator(settings: Settings, options: ExperimentOptions, out: Path, report) -> DataSetResult:
    from freshtower.app.event_log import simulated_end_day, simulated_start_day

    w = options.simulated
    # The days end at today's midnight (UTC): the streams worker dead-letters events ahead of the clock.
    start_day = simulated_start_day(simulated_end_day(datetime.now(UTC)), w.days)
    report(
        f"simulator ({w.name} world): {options.seeds} seeds, {w.days} days from {start_day}, {w.users:,} users, {w.items:,} items "
        f"(+{w.new_users_per_day:,} users and +{w.new_items_per_day:,} items a day), {w.requests_per_day:,} requests/day, K = {w.ks}"
    )
    seeds = list(range(options.first_seed, options.first_seed + options.seeds))
    # Through Kafka each seed has a broker and a streams worker of its own: one seed at a time.
    jobs = 1 if options.through == "kafka" else min(options.jobs, len(seeds))
    done: dict[int, list[ArmResult]] = {}

    def finished(seed: int, results: list[ArmResult]) -> None:
        done[seed] = results
        so_far = DataSetResult(f"simulator/{w.name}", w.ks, [done[s] for s in sorted(done)], "t", options.resamples)
        # The seeds done so far, written after each: a long run that is stopped keeps them.
        (out / "table-so-far.md").write_text(format_tables([so_far]))
        (out / "results-so-far.json").write_text(json.dumps(results_json([so_far], options, 0.0), indent=1))
        report(f"  seed {seed} done: {len(done)} of {options.seeds}, tables so far in {out / 'table-so-far.md'}")

    out.mkdir(parents=True, exist_ok=True)
    if jobs == 1:
        for seed in seeds:
            finished(seed, _simulated_seed(settings, options, w, start_day, seed, out / f"seed-{seed}", report))
    else:
        threads = job_threads(jobs)
        report(f" {jobs} seeds at a time, each in its own process with {threads} torch thread(s); their logs in {out}/seed-N/log.txt")
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                pool.submit(_seed_job, settings, options, w, start_day, seed, out / f"seed-{seed}", threads): seed for seed in seeds
            }
            try:
                for future in as_completed(futures):
                    finished(futures[future], future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    # Seed order, whichever finished first: the tables do not depend on the jobs.
    return DataSetResult(f"simulator/{w.name}", w.ks, [done[s] for s in seeds], "t", options.resamples)


def job_threads(jobs: int, cores: int | None = None) -> int:
    """torch threads for each of ``jobs`` parallel seeds: the cores shared out, at least one each.

    >>> job_threads(2, cores=2), job_threads(2, cores=16), job_threads(4, cores=2)
    (1, 8, 1)
    """
    cores = cores or os.cpu_count() or 1
    return max(1, cores // jobs)


def _seed_job(settings: Settings, options: ExperimentOptions, w: World, start_day: str, seed: int, work: Path, threads: int):
    """One seed in a worker process: its torch threads set, its report lines to its log (and stdout, prefixed)."""
    import torch

    torch.set_num_threads(threads)
    if not settings.training.threads:  # the full trainer sets its own threads: the job's share
        settings = settings.model_copy(update={"training": settings.training.model_copy(update={"threads": threads})})
    work.mkdir(parents=True)
    with open(work / "log.txt", "a", encoding="utf-8") as log:

        def report(line: str) -> None:
            log.write(f"{line}\n")
            log.flush()
            print(f"[seed {seed}] {line.strip()}", flush=True)

        return _simulated_seed(settings, options, w, start_day, seed, work, report)


def _simulated_seed(settings: Settings, options: ExperimentOptions, w: World, start_day: str, seed: int, work: Path, report):
    """One seed's world: its batches (joined in process or through Kafka), then every arm and baseline on them."""
    from freshtower.app.simulator import Simulator, SimulatorConfig

    work.mkdir(parents=True, exist_ok=True)
    simulator = Simulator(
        SimulatorConfig(
            users=w.users, items=w.items, requests_per_day=w.requests_per_day, seed=seed, start_day=start_day,
            new_users_per_day=w.new_users_per_day, new_items_per_day=w.new_items_per_day, max_days=w.days,
        )
    )
    seeded = settings.model_copy(update={"training": settings.training.model_copy(update={"seed": seed})})
    report(f" seed {seed}")
    if options.through == "kafka":
        counts = simulator.write_events(work / "events.jsonl", range(w.days))
        batches, _ = _through_kafka(seeded, work / "events.jsonl", counts, report)
    else:
        batches = work / "batches"
        simulator.write_batches(batches, range(w.days), settings.streams.window_seconds)
    return _arms(seeded, options, work, batches, w.ks, report, seed)


def _single_world(settings: Settings, options: ExperimentOptions, data: str, work: Path, report) -> DataSetResult:
    """MovieLens-100k or the user's events: one world, bootstrap intervals over users."""
    work.mkdir(parents=True)
    ks = (50, 200) if data == "events" else (50, 100)
    if data == "movielens":
        data_settings, label = movielens.with_features(settings), "movielens-100k"
        report(f"movielens-100k: first {options.movielens_days} days")
        if options.through == "kafka":
            counts = movielens.write_first_days(work / "events.jsonl", options.movielens_days)
            batches, _ = _through_kafka(data_settings, work / "events.jsonl", counts, report)
        else:
            batches = work / "batches"
            windows = movielens.write_batches(batches, settings.streams.window_seconds, max_days=options.movielens_days)
            report(f"  {windows:,} batch windows")
    else:
        from freshtower.app.event_schema import check_schema, first_days

        data_settings, label = settings, f"events {options.events.name}"
        events = work / "events.jsonl"
        kept = first_days(options.events, events, options.days)
        schema = check_schema(events, data_settings)
        report(f"{label}: {kept.events:,} events over {kept.days} day(s); {schema.describe()}")
        counts = kept.counts
        batches, _ = _through_kafka(data_settings, events, counts, report)  # a user's log is joined by the real worker
    return DataSetResult(label, ks, [_arms(data_settings, options, work, batches, ks, report, 0)], "bootstrap", options.resamples)


def _arms(settings: Settings, options: ExperimentOptions, work: Path, batches: Path, ks, report, seed: int) -> list[ArmResult]:
    return run_arms(
        settings, work, batches, arms=ARMS if options.arms == "all" else MAIN_ARMS, ks=tuple(ks), report=report,
        exclude_seen=options.exclude_seen,
        new_item_vectors=options.new_item_vectors, seed=seed,
    )


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
