"""The arms of the freshness experiment, replayed in event time.

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
found (``trainer.metrics``). So a release that learnt the user's earlier
clicks of the day is credited, and one that had not yet been published is
not.

Freshness: for every click, the event-time delay from the click to the
first release that learnt it (a full model's release for ``daily-full``).

Pure bookkeeping lives in small functions; ``run_arms`` is the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch
from freshtower.trainer.artifacts import adopt_full_model, full_models_dir, list_full_models, load_full_model
from freshtower.trainer.full import train_full
from freshtower.trainer.metrics import recall_per_unit, relevant_positions, top_k
from freshtower.trainer.online import OnlineTrainer, batch_key

from freshtower.core.batches import BatchRef, FeatureSpec, list_batches, read_batch
from freshtower.core.eventtime import DAY_MS, HOUR_MS, day_name, day_start_ms, floor_ms
from freshtower.core.settings import Settings


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
            if hour != floor_ms(t, HOUR_MS):
                for u, it in pending:
                    history.setdefault(u, set()).add(it)
                pending, hour = [], floor_ms(t, HOUR_MS)
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
        scores = vectors @ items.T  # (U, N), exact search
        if exclude_seen:  # what the user clicked before is not retrieved again (the usual MovieLens protocol)
            for n, unit in enumerate(units):
                if unit.seen:
                    seen = model.catalogue.indices(sorted(unit.seen))
                    scores[n, seen[(seen >= 0) & (seen < len(items))]] = -np.inf
        top = top_k(scores, max(ks))  # (U, min(K, N))
        relevant = [relevant_positions(model.catalogue.indices(sorted(unit.clicked)).tolist()) for unit in units]
        by_k = {k: recall_per_unit(top, relevant, k).tolist() for k in ks}
        return [{k: by_k[k][n] for k in ks} for n in range(len(units))]


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


@dataclass(frozen=True)
class _Replay:
    """What every arm's replay reads: the batches, the full models and when each is released."""

    refs: list[BatchRef]
    spec: FeatureSpec
    full_refs: list
    released_at: dict[str, int]  # full model version -> release time (event ms)
    lateness_ms: int
    ks: tuple[int, ...]
    exclude_seen: bool


# the kinds of timeline events, in the order they happen at the same moment
_FULL_RELEASE, _BATCH_READY, _UNIT = 0, 1, 2


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
    full_refs, released_at = _train_daily_models(settings, work_dir, batches_dir, refs, report)
    replay = _Replay(refs, spec, full_refs, released_at, int(settings.streams.allowed_lateness_seconds * 1000), ks, exclude_seen)
    evaluation_start = released_at[full_refs[0].version]
    units = units_from(refs, spec, evaluation_start)
    report(f"  {len(units):,} (user, hour) units to score from {day_name(evaluation_start)}")

    # Every arm's trainer starts before any arm is replayed.
    states = [_ArmState(arm, since_ms=evaluation_start) for arm in arms]
    for state in states:
        if state.arm.online:
            arm_settings = _arm_settings(settings, work_dir / _slug(state.arm.name), batches_dir)
            _reveal(full_refs[0], arm_settings)
            state.trainer = OnlineTrainer.start(arm_settings)
        state.served = Served(*_full_state(full_refs[0]))
    timeline = _timeline(replay, units, evaluation_start)
    for state in states:
        _replay_arm(state, timeline, replay)
        report(f"  replayed arm {state.arm.name}")
    return [_result(state, ks) for state in states]


def _train_daily_models(settings: Settings, work_dir: Path, batches_dir: Path, refs: list[BatchRef], report) -> tuple[list, dict[str, int]]:
    """The daily full models, once for all arms (every day but the last);
    each is released at D+1 00:00 + delay + its measured training time."""
    first_day = floor_ms(refs[0].window_start_ms, DAY_MS)
    days = sorted({floor_ms(r.window_start_ms, DAY_MS) for r in refs})
    delay_ms = int(settings.training.full_delay_seconds * 1000)
    models_settings = _arm_settings(settings, work_dir / "full", batches_dir)
    released_at: dict[str, int] = {}
    for day_ms in days[:-1]:
        started = time.perf_counter()
        result = train_full(models_settings, day_name(day_ms), from_scratch=day_ms == first_day)
        seconds = time.perf_counter() - started
        released_at[result.ref.version] = day_ms + DAY_MS + delay_ms + int(seconds * 1000)
        recall = result.metrics.get("exact", {}).get("recall@50", math.nan)
        report(f"  full model {result.ref.version}: {result.samples:,} samples in {seconds:.1f} s, holdout Recall@50 {recall:.4f}")
    full_refs = list_full_models(full_models_dir(models_settings))
    if not full_refs:
        raise ValueError("need at least two days of batches: one for the first full model, one to evaluate on")
    return full_refs, released_at


def _timeline(replay: _Replay, units: list[Unit], evaluation_start: int) -> list[tuple[int, int, object]]:
    """(event time, kind, payload) in event-time order: batch ready, full release, evaluation unit."""
    first = replay.full_refs[0]
    events: list[tuple[int, int, object]] = []
    for ref in replay.refs:
        if ref.window_start_ms >= first.data_end_ms:  # before the first model: caught up when it arrives
            events.append((max(ref.manifest.window_end_ms + replay.lateness_ms, evaluation_start), _BATCH_READY, ref))
    for ref in replay.full_refs[1:]:
        events.append((replay.released_at[ref.version], _FULL_RELEASE, ref))
    for unit in units:
        events.append((unit.time_ms, _UNIT, unit))
    events.sort(key=lambda e: (e[0], e[1]))
    return events


def _replay_arm(state: _ArmState, timeline: list[tuple[int, int, object]], replay: _Replay) -> None:
    """One arm through the timeline: units are scored in groups by the release serving them."""
    item_cache: dict = {}
    pending_units: list[Unit] = []

    def flush_units(state: _ArmState) -> None:
        if pending_units:
            for unit, scores in zip(pending_units, state.served.recall(pending_units, replay.ks, item_cache, replay.exclude_seen)):
                state.scores.append((unit.hour_ms, scores))
        pending_units.clear()

    for now, kind, payload in timeline:
        _publish_ticks(state, now, flush_units)
        if kind == _UNIT:
            pending_units.append(payload)
        elif kind == _FULL_RELEASE and state.arm.full_models:
            flush_units(state)
            _take_full_release(state, payload, now, replay)
        elif kind == _BATCH_READY and state.trainer is not None:
            trainer = state.trainer
            if payload.window_start_ms >= trainer.next_window_ms and batch_key(payload) not in trainer.trained_recent:
                _train(state, payload, now, replay.spec)
    flush_units(state)


def _take_full_release(state: _ArmState, model_ref, now: int, replay: _Replay) -> None:
    """A full release reaches an arm that follows full models: its online
    trainer re-bases and catches up on the batches ready by now, or (no
    online trainer) the full model itself is served."""
    _learnt_by_full(state, model_ref, replay.released_at[model_ref.version], replay.refs, replay.spec)
    if state.trainer is None:
        state.served = Served(*_full_state(model_ref))
        return
    _reveal(model_ref, state.trainer.settings)
    state.trainer.rebase_if_newer()
    # Catch up on the batches since the model's data end that are ready now.
    for ref in state.trainer.pending():
        if ref.manifest.window_end_ms + replay.lateness_ms <= now:
            _train(state, ref, now, replay.spec)
    state.served = Served(state.trainer.model, state.trainer.model.user_tower.id_embedding.detach().clone())


def _result(state: _ArmState, ks: tuple[int, ...]) -> ArmResult:
    by_hour: dict[int, list[float]] = {}
    for hour, scores in state.scores:
        by_hour.setdefault(hour, []).append(scores[ks[0]])
    return ArmResult(
        state.arm.name,
        {k: float(np.mean([s[k] for _, s in state.scores])) if state.scores else math.nan for k in ks},
        sorted((h, float(np.mean(v))) for h, v in by_hour.items()),
        np.concatenate(state.freshness) if state.freshness else np.zeros(0),
        len(state.scores),
    )


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


def _publish_ticks(state: _ArmState, now: int, flush_units: Callable[[_ArmState], None]) -> None:
    """Publish at every tick up to ``now`` at which something was learnt."""
    interval = state.arm.publish_interval_ms
    if interval is None or not state.unpublished:
        return
    while state.unpublished:
        tick = next_tick(min(t for _, t in state.unpublished), interval)
        if tick > now:
            return
        flush_units(state)  # units before the tick see the previous release
        ready = [(c, t) for c, t in state.unpublished if t <= tick]
        state.unpublished = [(c, t) for c, t in state.unpublished if t > tick]
        for clicks, _ in ready:
            state.freshness.append((tick - clicks) / 1000)
        state.served = Served(state.trainer.model, state.trainer.model.user_tower.id_embedding.detach().clone())


def _learnt_by_full(state: _ArmState, model_ref, released_ms: int, refs: list[BatchRef], spec: FeatureSpec) -> None:
    """Freshness of the clicks a full model learnt, for the arm that only has full models."""
    if state.trainer is not None:
        return  # the online trainer published them earlier
    day_ms = day_start_ms(date.fromisoformat(model_ref.day))
    for ref in refs:
        if day_ms <= ref.window_start_ms < day_ms + DAY_MS:
            clicks = read_batch(ref, spec).event_time_ms.astype(np.int64)
            state.freshness.append((released_ms - clicks[clicks >= state.since_ms]) / 1000)


def _full_state(model_ref) -> tuple[object, torch.Tensor]:
    model = load_full_model(model_ref).model
    model.eval()
    return model, model.user_tower.id_embedding.detach().clone()


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
