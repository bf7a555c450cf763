"""The freshness experiment: what fresh user embeddings are worth.

Four ways to serve the same stream of batches, replayed in event time with
the real trainers (``trainer.full.train_full`` for the daily models,
``trainer.online.OnlineTrainer`` for the user-ID-only updates):

- ``daily-full``: only the daily full model, released when day D+1 00:00
  plus ``training.full_delay_seconds`` plus the measured training time has
  passed.
- ``incremental``: the first day's full model, then online updates only
  (never re-based), published every minute.
- ``full+inc/30min`` and ``full+inc/1min``: both; the online trainer
  re-bases onto each new full model and catches up, its user rows are
  published every 30 minutes or every minute.

Time. A batch is ready for training once its window has closed and the
allowed lateness has passed (``window_end + allowed_lateness``); it is
trained then, and the wall seconds that took (measured) are added, as
they would be in production where event time and wall time run together.
A publish tick every ``interval`` releases what the trainer has learnt by
then. (Release writing is not timed here: ~0.1 s for a few thousand rows,
see ``benchmarks/bench_recall.py`` for 1M rows.)

Quality: next-hour Recall@K. Each (user, hour) with clicks is one unit:
when the user first clicks in that hour, the release active at that
moment computes the user vector (user tower on the released ID row and
the request's features) and retrieves the top K by exact search over that
release's item vectors; recall = share of the user's clicks in that hour
found. So a release that learnt the user's earlier clicks of the day is
credited, and one that had not yet been published is not.

Freshness: for every click, the event-time delay from the click to the
first release that learnt it (a full model's release for ``daily-full``).

Pure bookkeeping lives in small functions; ``run_arms`` is the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from freshtower.trainer.artifacts import adopt_full_model, full_models_dir, list_full_models, load_full_model
from freshtower.trainer.full import train_full
from freshtower.trainer.online import OnlineTrainer, batch_key

from freshtower.core.batches import BatchRef, FeatureSpec, Sample, list_batches, read_batch, write_batch
from freshtower.core.settings import Settings

MS_PER_DAY = 86_400_000
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Arm:
    name: str
    full_models: bool  # re-base onto each daily full model
    online: bool
    publish_interval_ms: int | None  # online publishing period


ARMS = (
    Arm("daily-full", True, False, None),
    Arm("incremental", False, True, 60_000),
    Arm("full+inc/30min", True, True, 1_800_000),
    Arm("full+inc/1min", True, True, 60_000),
)


@dataclass
class Unit:
    """One user's clicks in one hour, scored at the user's first click."""

    time_ms: int
    hour_ms: int
    user_id: str
    categorical: dict[str, str]
    numeric: np.ndarray
    clicked: set[str]
    seen: frozenset[str] = frozenset()  # items the user clicked before this hour


@dataclass
class ArmResult:
    arm: str
    recall: dict[int, float]  # K -> mean next-hour Recall@K over units
    hourly: list[tuple[int, float]]  # (hour start ms, Recall@50 that hour)
    freshness_s: np.ndarray  # per learnt click, event-time seconds
    units: int

    def freshness_percentile(self, q: float) -> float:
        return float(np.percentile(self.freshness_s, q)) if len(self.freshness_s) else math.nan


def next_tick(time_ms: float, interval_ms: int) -> int:
    """The first publish tick at or after ``time_ms`` (ticks on multiples of the interval).

    >>> next_tick(60_000, 60_000), next_tick(60_001, 60_000)
    (60000, 120000)
    """
    return int(math.ceil(time_ms / interval_ms) * interval_ms)


def units_from(refs: list[BatchRef], spec: FeatureSpec, start_ms: int) -> list[Unit]:
    """(user, hour) evaluation units of the clicks from ``start_ms`` on,
    each with the items its user clicked in earlier hours."""
    units: dict[tuple[str, int], Unit] = {}
    history: dict[str, set[str]] = {}  # user -> items clicked in hours before the current one
    pending: list[tuple[str, str]] = []  # this hour's clicks, added to history when the hour ends
    hour = None
    for ref in refs:  # in window order, so clicks arrive in time order up to a window
        samples = read_batch(ref, spec)
        for i in np.argsort(samples.event_time_ms, kind="stable").tolist():
            t = int(samples.event_time_ms[i])
            user, item = samples.user_ids[i], samples.item_ids[i]
            if hour != t - t % HOUR_MS:
                for u, it in pending:
                    history.setdefault(u, set()).add(it)
                pending, hour = [], t - t % HOUR_MS
            pending.append((user, item))
            if t < start_ms:
                continue
            key = (user, hour)
            unit = units.get(key)
            if unit is None:
                unit = units[key] = Unit(
                    t, hour, user, {k: v[i] for k, v in samples.user_categorical.items()}, samples.user_numeric[i].copy(), set(),
                    frozenset(history.get(user, ())),
                )
            unit.clicked.add(item)
    return sorted(units.values(), key=lambda u: u.time_ms)


@dataclass
class Served:
    """What one arm serves: a model (towers, vocabularies, items) and the released user ID table."""

    model: object
    table: torch.Tensor

    @torch.no_grad()
    def recall(self, units: list[Unit], ks: tuple[int, ...], item_cache: dict, exclude_seen: bool = False) -> list[dict[int, float]]:
        model = self.model
        key = id(model)
        if key not in item_cache:
            item_cache.clear()
            item_cache[key] = model.catalogue_vectors()[: len(model.catalogue)].numpy()
        items = item_cache[key]
        inputs = model.user_inputs(
            [u.user_id for u in units],
            {name: [u.categorical.get(name, "") for u in units] for name in model.user_categorical},
            np.stack([u.numeric for u in units]).astype(np.float32),
        )
        rows = inputs.id_rows.clone()
        rows[rows >= len(self.table)] = 0  # admitted after this release: the default row
        vectors = model.user_tower.from_id_vectors(self.table[rows], inputs).numpy()
        k_max = min(max(ks), len(items))
        scores = vectors @ items.T  # (U, N), exact search
        if exclude_seen:  # what the user clicked before is not retrieved again (the usual MovieLens protocol)
            for n, unit in enumerate(units):
                if unit.seen:
                    seen = model.catalogue.indices(sorted(unit.seen))
                    scores[n, seen[(seen >= 0) & (seen < len(items))]] = -np.inf
        top = np.argpartition(-scores, k_max - 1, axis=1)[:, :k_max]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        results = []
        for unit, row in zip(units, top.tolist()):
            wanted = model.catalogue.indices(sorted(unit.clicked)).tolist()
            results.append({k: len(set(wanted) & set(row[:k])) / len(unit.clicked) for k in ks})
        return results


@dataclass
class _ArmState:
    arm: Arm
    served: Served | None = None
    trainer: OnlineTrainer | None = None
    last_tick_ms: int = -1
    unpublished: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (click times, trained at)
    since_ms: int = 0  # freshness counts clicks from the first full release on (before it nothing serves)
    learnt: set = field(default_factory=set)  # batches whose clicks were learnt once (a re-base re-learns some)
    freshness: list[np.ndarray] = field(default_factory=list)
    scores: list[tuple[int, dict[int, float]]] = field(default_factory=list)  # (hour, recall by K)


def run_arms(
    settings: Settings,
    work_dir: Path,
    batches_dir: Path,
    arms=ARMS,
    ks: tuple[int, ...] = (50, 100),
    report: Callable[[str], None] = print,
    exclude_seen: bool = False,
) -> list[ArmResult]:
    """Train the daily full models once, then replay every arm in event time."""
    spec = FeatureSpec.from_model(settings.model)
    refs = list_batches(batches_dir)
    if not refs:
        raise FileNotFoundError(f"no batches under {batches_dir}")
    first_day = refs[0].window_start_ms - refs[0].window_start_ms % MS_PER_DAY
    days = sorted({r.window_start_ms - r.window_start_ms % MS_PER_DAY for r in refs})
    lateness_ms = int(settings.streams.allowed_lateness_seconds * 1000)
    delay_ms = int(settings.training.full_delay_seconds * 1000)

    # The daily full models, once for all arms; each is released at D+1 00:00
    # + delay + its measured training time.
    models_settings = _arm_settings(settings, work_dir / "full", batches_dir)
    released_at: dict[str, int] = {}
    for day_ms in days[:-1]:
        day = _day_name(day_ms)
        started = time.perf_counter()
        result = train_full(models_settings, day, from_scratch=day_ms == first_day)
        seconds = time.perf_counter() - started
        released_at[result.ref.version] = day_ms + MS_PER_DAY + delay_ms + int(seconds * 1000)
        recall = result.metrics.get("exact", {}).get("recall@50", math.nan)
        report(f"  full model {result.ref.version}: {result.samples:,} samples in {seconds:.1f} s, holdout Recall@50 {recall:.4f}")
    full_refs = list_full_models(full_models_dir(models_settings))
    if not full_refs:
        raise ValueError("need at least two days of batches: one for the first full model, one to evaluate on")
    evaluation_start = released_at[full_refs[0].version]
    units = units_from(refs, spec, evaluation_start)
    report(f"  {len(units):,} (user, hour) units to score from {_day_name(evaluation_start)}")

    states = [_ArmState(arm, since_ms=evaluation_start) for arm in arms]
    for state in states:
        if state.arm.online:
            arm_settings = _arm_settings(settings, work_dir / _slug(state.arm.name), batches_dir)
            _reveal(full_refs[0], arm_settings)
            state.trainer = OnlineTrainer.start(arm_settings)
        state.served = Served(*_full_state(full_refs[0]))

    # Events in event-time order: batch ready, full release, evaluation unit.
    events: list[tuple[int, int, object]] = []
    for ref in refs:
        if ref.window_start_ms >= full_refs[0].data_end_ms:  # before the first model: caught up when it arrives
            events.append((max(ref.manifest.window_end_ms + lateness_ms, evaluation_start), 1, ref))
    for ref in full_refs[1:]:
        events.append((released_at[ref.version], 0, ref))
    for unit in units:
        events.append((unit.time_ms, 2, unit))
    events.sort(key=lambda e: (e[0], e[1]))

    item_cache: dict = {}
    pending_units: list[Unit] = []

    def flush_units(state: _ArmState) -> None:
        if pending_units:
            for unit, scores in zip(pending_units, state.served.recall(pending_units, ks, item_cache, exclude_seen)):
                state.scores.append((unit.hour_ms, scores))

    for state in states:
        pending_units.clear()
        item_cache.clear()
        for now, kind, payload in events:
            _publish_ticks(state, now, flush_units, pending_units)
            if kind == 2:
                pending_units.append(payload)
                continue
            if kind == 0 and state.arm.full_models:  # a full release
                flush_units(state)
                pending_units.clear()
                model_ref = payload
                _learnt_by_full(state, model_ref, released_at[model_ref.version], refs, spec)
                if state.trainer is not None:
                    _reveal(model_ref, state.trainer.settings)
                    state.trainer.rebase_if_newer()
                    # Catch up on the batches since the model's data end that are ready now.
                    for ref in state.trainer.pending():
                        if ref.manifest.window_end_ms + lateness_ms <= now:
                            _train(state, ref, now, spec)
                    state.served = Served(state.trainer.model, state.trainer.model.user_tower.id_embedding.detach().clone())
                else:
                    state.served = Served(*_full_state(model_ref))
            elif kind == 1 and state.trainer is not None:
                trainer = state.trainer
                if payload.window_start_ms >= trainer.next_window_ms and batch_key(payload) not in trainer.trained_recent:
                    _train(state, payload, now, spec)
        flush_units(state)
        pending_units.clear()
        report(f"  replayed arm {state.arm.name}")

    results = []
    for state in states:
        by_hour: dict[int, list[float]] = {}
        for hour, scores in state.scores:
            by_hour.setdefault(hour, []).append(scores[ks[0]])
        results.append(
            ArmResult(
                state.arm.name,
                {k: float(np.mean([s[k] for _, s in state.scores])) if state.scores else math.nan for k in ks},
                sorted((h, float(np.mean(v))) for h, v in by_hour.items()),
                np.concatenate(state.freshness) if state.freshness else np.zeros(0),
                len(state.scores),
            )
        )
    return results


def _train(state: _ArmState, ref: BatchRef, now: int, spec: FeatureSpec) -> None:
    started = time.perf_counter()
    samples = read_batch(ref, spec)
    state.trainer.learn_batch(ref, samples)
    trained_at = now + (time.perf_counter() - started) * 1000
    clicks = samples.event_time_ms.astype(np.int64)
    key = batch_key(ref)
    if key in state.learnt:  # caught up again after a re-base: its clicks reached serving already
        clicks = clicks[:0]
    state.learnt.add(key)
    state.unpublished.append((clicks[clicks >= state.since_ms], trained_at))


def _publish_ticks(state: _ArmState, now: int, flush_units, pending_units: list) -> None:
    """Publish at every tick up to ``now`` at which something was learnt."""
    interval = state.arm.publish_interval_ms
    if interval is None or not state.unpublished:
        return
    while state.unpublished:
        tick = next_tick(min(t for _, t in state.unpublished), interval)
        if tick > now:
            return
        flush_units(state)  # units before the tick see the previous release
        pending_units.clear()
        ready = [(c, t) for c, t in state.unpublished if t <= tick]
        state.unpublished = [(c, t) for c, t in state.unpublished if t > tick]
        for clicks, _ in ready:
            state.freshness.append((tick - clicks) / 1000)
        state.served = Served(state.trainer.model, state.trainer.model.user_tower.id_embedding.detach().clone())


def _learnt_by_full(state: _ArmState, model_ref, released_ms: int, refs: list[BatchRef], spec: FeatureSpec) -> None:
    """Freshness of the clicks a full model learnt, for the arm that only has full models."""
    if state.trainer is not None:
        return  # the online trainer published them earlier
    day_ms = _day_ms(model_ref.day)
    for ref in refs:
        if day_ms <= ref.window_start_ms < day_ms + MS_PER_DAY:
            clicks = read_batch(ref, spec).event_time_ms.astype(np.int64)
            state.freshness.append((released_ms - clicks[clicks >= state.since_ms]) / 1000)


def _full_state(model_ref) -> tuple[object, torch.Tensor]:
    model = load_full_model(model_ref).model
    model.eval()
    return model, model.user_tower.id_embedding.detach().clone()


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


def _arm_settings(settings: Settings, data_dir: Path, batches_dir: Path) -> Settings:
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "batches"
    if not link.exists():
        link.symlink_to(batches_dir.resolve(), target_is_directory=True)
    return settings.model_copy(update={"data_dir": data_dir})


def _reveal(model_ref, settings: Settings) -> None:
    """Make a full model visible to an arm's online trainer (its release time has come)."""
    models = full_models_dir(settings)
    if not (models / model_ref.version).exists():
        adopt_full_model(model_ref, models)  # copied, sealed, then LATEST moved atomically


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def _day_name(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))


def _day_ms(day: str) -> int:
    return int(np.datetime64(day, "ms").astype(np.int64))


def movielens_batches(batches_dir: Path, window_seconds: float, time_scale: float = 1.0, max_days: int | None = None) -> int:
    """MovieLens-100k as batch files: each rating an impression record,
    label 1 at the click time for ratings >= 4 (``freshtower.app.movielens``
    has the mapping and its limits). The join here is the trivial one the
    data allows (every click's impression is in the same request); the
    Kafka path is ``freshtower movielens --events`` + ``freshtower run``."""
    from freshtower.app.movielens import load_events

    stream = load_events(time_scale=time_scale)
    end_ms = None if max_days is None else stream.first_ms - stream.first_ms % MS_PER_DAY + max_days * MS_PER_DAY
    clicked: set[tuple[str, str]] = set()
    click_ms: dict[tuple[str, str], int] = {}
    for topic, event in stream.events:
        if topic == "clicks":
            clicked.add((event["request_id"], event["item_id"]))
            click_ms[(event["request_id"], event["item_id"])] = event["ts"]
    window_ms = int(window_seconds * 1000)
    by_window: dict[int, list[Sample]] = {}
    for topic, event in stream.events:
        if topic != "impressions" or (end_ms is not None and event["ts"] >= end_ms):
            continue
        features = event["user_features"]
        for shown in event["items"]:
            key = (event["request_id"], shown["item_id"])
            ts = click_ms.get(key, event["ts"])
            sample = Sample(
                user_id=event["user_id"],
                item_id=shown["item_id"],
                label=int(key in clicked),
                event_time_ms=ts,
                request_id=event["request_id"],
                position=shown["position"],
                user_categorical=dict(features["categorical"]),
                user_numeric=dict(features["numeric"]),
                item_categorical=dict(shown.get("features", {})),
                hard_negative_ids=(),
                teacher_score=None,
            )
            by_window.setdefault(ts - ts % window_ms, []).append(sample)
    for start in sorted(by_window):
        write_batch(batches_dir, start, start + window_ms, by_window[start])
    return len(by_window)


def movielens_events(path: Path, max_days: int | None = None) -> dict[str, int]:
    """MovieLens-100k's first ``max_days`` days (real time) as a replay-format
    event log, for ``freshtower.app.streamed_batches``: the same impressions
    and clicks ``movielens_batches`` joins offline."""
    from freshtower.app.movielens import MovieLensStream, load_events, write_events

    stream = load_events()
    if max_days is not None:
        end_ms = stream.first_ms - stream.first_ms % MS_PER_DAY + max_days * MS_PER_DAY
        kept = {e["request_id"] for topic, e in stream.events if topic == "impressions" and e["ts"] < end_ms}
        events = [(topic, e) for topic, e in stream.events if e["request_id"] in kept]
        stream = MovieLensStream(events, stream.first_ms, events[-1][1]["ts"], stream.ratings, sum(t == "clicks" for t, _ in events))
    return write_events(path, stream)


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
