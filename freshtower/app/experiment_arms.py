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
allowed lateness has passed (``window_end + allowed_lateness``). Each
online trainer keeps a clock of its own, counted cumulatively: a batch
starts when it is ready and the trainer is free (``max(ready, busy)``),
and ends the measured wall seconds of its training later, as in
production where event time and wall time run together. So a catch-up
after a re-base (the re-base's own load counted too) reaches its batches
one after the other, and a publish tick every ``interval`` releases
exactly what the trainer had finished by then: the rows before a batch
still in training at the tick are kept aside for it. (Release writing is not timed here: ~0.1 s for a few thousand rows,
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

Served items: a full release serves its model's catalogue; an online
release serves the items of its full model (what the service's index
holds), or, with ``new_item_vectors``, also the items the online trainer
has seen since, embedded by the frozen item tower.

The baselines (``experiment_baselines``: most popular over the last day
and the last hour, random) are scored on the same units.

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
from freshtower.trainer.metrics import top_k
from freshtower.trainer.online import OnlineTrainer, batch_key

from freshtower.publisher.new_items import feature_mean_rows
from freshtower.trainer.new_item_clicks import NewItemClicks, blend_with_clicks

from freshtower.app.experiment_baselines import BASELINES, baseline_scores
from freshtower.app.experiment_units import Unit, UnitScore, score_unit, units_from
from freshtower.core.batches import BatchRef, FeatureSpec, list_batches, read_batch
from freshtower.core.eventtime import DAY_MS, day_name, day_start_ms, floor_ms
from freshtower.core.settings import Settings

__all__ = ["ARMS", "MAIN_ARMS", "Arm", "ArmResult", "BASELINES", "next_tick", "run_arms", "units_from"]


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
# The default arms of ``freshtower experiment`` (``--arms all``: every one of ARMS).
MAIN_ARMS = tuple(a for a in ARMS if a.name in ("daily-full", "full+inc/1min"))


@dataclass
class ArmResult:
    """One arm's (or baseline's) figures on one world."""

    arm: str
    scores: list[UnitScore]  # per unit, in the units' time order
    units: list[Unit] = field(repr=False, default_factory=list)
    freshness_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per learnt click, event-time seconds
    baseline: bool = False

    @property
    def unit_count(self) -> int:
        return len(self.scores)

    def recall(self, k: int, new_user: bool | None = None) -> float:
        """Mean Recall@K over units (of new users only, returning only, or all)."""
        values = [s.recall[k] for s, u in zip(self.scores, self.units) if new_user is None or u.new_user == new_user]
        return float(np.mean(values)) if values else math.nan

    def click_recall(self, k: int, born_today: bool) -> float:
        """Share of the clicks on items born that day (or on older items) found in the unit's top K."""
        hits = sum((s.new_item_hits if born_today else s.old_item_hits)[k] for s in self.scores)
        clicks = sum(s.new_item_clicks if born_today else s.old_item_clicks for s in self.scores)
        return hits / clicks if clicks else math.nan

    def unit_recall(self, k: int) -> np.ndarray:
        return np.array([s.recall[k] for s in self.scores])

    def hourly(self, k: int = 50) -> list[tuple[int, float]]:
        """(hour start ms, mean Recall@K of that hour's units)."""
        by_hour: dict[int, list[float]] = {}
        for score, unit in zip(self.scores, self.units):
            by_hour.setdefault(unit.hour_ms, []).append(score.recall[k])
        return sorted((h, float(np.mean(v))) for h, v in by_hour.items())

    def freshness_percentile(self, q: float) -> float:
        return float(np.percentile(self.freshness_s, q)) if len(self.freshness_s) else math.nan


def next_tick(time_ms: float, interval_ms: int) -> int:
    """The first publish tick at or after ``time_ms`` (ticks on multiples of the interval).

    >>> next_tick(60_000, 60_000), next_tick(60_001, 60_000)
    (60000, 120000)
    """
    return int(math.ceil(time_ms / interval_ms) * interval_ms)


@dataclass
class Served:
    """What one arm serves: a model (towers, vocabularies, items), the released user ID table and how many of the
    model's catalogue items the release's index holds."""

    model: object
    table: torch.Tensor
    items: int
    new_from: int | None = None  # items from here on were first seen online (publisher.new_item_vectors)
    id_row: str = "feature_mean"  # how those are embedded (publisher.new_item_id_row)
    clicks: NewItemClicks | None = None  # their clickers' vectors (publisher.new_item_clicks), blended in
    click_prior: float = 10.0  # publisher.new_item_click_prior

    @torch.no_grad()
    def retrieve(self, units: list[Unit], k: int, item_cache: dict, exclude_seen: bool = False) -> list[list[str]]:
        """The top ``k`` item IDs for each unit, best first (exact search)."""
        model = self.model
        vectors_of_items, ids = _served_items(model, self.items, item_cache, self.new_from, self.id_row)
        if self.clicks is not None and self.new_from is not None and len(ids) > self.new_from:
            first = self.new_from
            blended = blend_with_clicks(vectors_of_items[first:], self.clicks, self.click_prior)
            vectors_of_items = np.concatenate([vectors_of_items[:first], blended])
        inputs = model.user_inputs(
            [u.user_id for u in units],
            {name: [u.categorical.get(name, "") for u in units] for name in model.user_categorical},
            np.stack([u.numeric for u in units]).astype(np.float32),
        )
        rows = inputs.id_rows.clone()
        rows[rows >= len(self.table)] = 0  # admitted after this release: the default row
        vectors = model.user_tower.from_id_vectors(self.table[rows], inputs).numpy()
        scores = vectors @ vectors_of_items.T  # (U, N), exact search
        if exclude_seen:  # what the user clicked before is not retrieved again (the usual MovieLens protocol)
            for n, unit in enumerate(units):
                if unit.seen:
                    seen = model.catalogue.indices(sorted(unit.seen))
                    scores[n, seen[(seen >= 0) & (seen < len(ids))]] = -np.inf
        top = top_k(scores, k)
        return [ids[row].tolist() for row in top]


def _served_items(model, count: int, cache: dict, new_from: int | None = None, id_row: str = "feature_mean") -> tuple[np.ndarray, np.ndarray]:
    """(vectors, IDs) of the first ``count`` catalogue items of ``model``; grown in place as the catalogue grows.
    Items from ``new_from`` on were first seen online (no ID row of their own): embedded as the publisher embeds them
    for an embeddings release (``publisher.new_item_id_row``, ``publisher.new_items``)."""
    if cache.get("model") is not model:
        cache.clear()
        cache.update(model=model, vectors=np.zeros((0, 0), np.float32), ids=np.zeros(0, dtype=object))
    have = len(cache["ids"])
    if count > have:
        indices = np.arange(have, count)
        inputs = model.catalogue_inputs(indices)
        fresh = model.item_vectors(inputs)
        if new_from is not None and id_row == "feature_mean" and (indices >= new_from).any():
            if "means" not in cache:
                cache["means"] = feature_mean_rows(model)
            means = cache["means"]
            keys = model.catalogue.features_of(indices)
            id_vectors = torch.stack([means.get(tuple(key), means[()]) for key in keys])
            by_mean = model.item_tower.from_id_vectors(id_vectors, inputs)
            new = torch.from_numpy(indices >= new_from)
            fresh = torch.where(new.unsqueeze(1), by_mean, fresh)
        fresh = fresh.numpy()
        cache["vectors"] = fresh if have == 0 else np.concatenate([cache["vectors"], fresh])
        cache["ids"] = np.array(model.catalogue.ids[:count], dtype=object)
    return cache["vectors"][:count], cache["ids"][:count]


@dataclass
class _ArmState:
    arm: Arm
    served: Served | None = None
    trainer: OnlineTrainer | None = None
    base_items: int = 0  # items of the online trainer's full model (what its releases serve without new-item vectors)
    busy_until_ms: float = -math.inf  # the online trainer's own clock: when it is free
    queue: list[tuple[BatchRef, int]] = field(default_factory=list)  # (batch, ready ms) waiting for the trainer
    before_inflight: tuple[float, torch.Tensor] | None = None  # (finish ms, rows before) of the last batch trained
    unpublished: list[tuple[str, np.ndarray, float]] = field(default_factory=list)  # (batch key, click times, trained at)
    since_ms: int = 0  # freshness counts clicks from the first full release on (before it nothing serves)
    learnt: set = field(default_factory=set)  # batches whose clicks reached serving once (a re-base re-learns some)
    freshness: list[np.ndarray] = field(default_factory=list)
    scores: dict[int, UnitScore] = field(default_factory=dict)  # unit index -> score


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
    new_item_vectors: bool
    new_item_id_row: str
    new_item_clicks: bool
    new_item_click_prior: float
    clicks: dict  # batch path -> its clicked samples, decoded once for every arm

    def clicks_of(self, ref: BatchRef):
        samples = self.clicks.get(str(ref.path))
        return samples if samples is not None else read_batch(ref, self.spec)


# the kinds of timeline events, in the order they happen at the same moment
_FULL_RELEASE, _BATCH_READY, _UNIT = 0, 1, 2


def run_arms(
    settings: Settings,
    work_dir: Path,
    batches_dir: Path,
    arms=ARMS,
    ks: tuple[int, ...] = (50, 200),
    report: Callable[[str], None] = print,
    exclude_seen: bool = False,
    new_item_vectors: bool | None = None,
    baselines: bool = True,
    seed: int = 0,
) -> list[ArmResult]:
    """Train the daily full models once, then replay every arm in event time; the baselines on the same units.
    ``new_item_vectors`` None: ``publisher.new_item_vectors`` says whether online releases serve new items."""
    if new_item_vectors is None:
        new_item_vectors = settings.publisher.new_item_vectors
    spec = FeatureSpec.from_model(settings.model)
    refs = list_batches(batches_dir)
    if not refs:
        raise FileNotFoundError(f"no batches under {batches_dir}")
    full_refs, released_at = _train_daily_models(settings, work_dir, batches_dir, refs, report)
    lateness_ms = int(settings.streams.allowed_lateness_seconds * 1000)
    clicks: dict = {}
    replay = _Replay(
        refs, spec, full_refs, released_at, lateness_ms, ks, exclude_seen, new_item_vectors, settings.publisher.new_item_id_row,
        settings.publisher.new_item_clicks, settings.publisher.new_item_click_prior, clicks,
    )
    evaluation_start = released_at[full_refs[0].version]
    units = units_from(refs, spec, evaluation_start, clicks)
    new_users = sum(u.new_user for u in units)
    report(f"  {len(units):,} (user, hour) units to score from {day_name(evaluation_start)} ({new_users:,} of users first seen that day)")

    # Every arm's trainer starts before any arm is replayed.
    states = [_ArmState(arm, since_ms=evaluation_start) for arm in arms]
    for state in states:
        if state.arm.online:
            arm_settings = _arm_settings(settings, work_dir / _slug(state.arm.name), batches_dir)
            _reveal(full_refs[0], arm_settings)
            state.trainer = OnlineTrainer.start(arm_settings)
            state.base_items = len(state.trainer.model.catalogue)
        state.served = Served(*_full_state(full_refs[0]))
    timeline = _timeline(replay, units, evaluation_start)
    results = []
    for state in states:
        started = time.perf_counter()
        _replay_arm(state, timeline, replay)
        report(f"  replayed arm {state.arm.name} in {time.perf_counter() - started:.0f} s")
        results.append(_result(state, units))
    if baselines:
        for name, scores in baseline_scores(refs, spec, units, ks, lateness_ms, seed, clicks).items():
            results.append(ArmResult(name, scores, units, baseline=True))
    return results


def _train_daily_models(settings: Settings, work_dir: Path, batches_dir: Path, refs: list[BatchRef], report) -> tuple[list, dict[str, int]]:
    """The daily full models, once for all arms (every complete day: the last day's model would only serve after the
    stream); each is released at D+1 00:00 + delay + its measured training time."""
    first_day = floor_ms(refs[0].window_start_ms, DAY_MS)
    days = sorted({floor_ms(r.window_start_ms, DAY_MS) for r in refs})
    delay_ms = int(settings.training.full_delay_seconds * 1000)
    models_settings = _arm_settings(settings, work_dir / "full", batches_dir)
    released_at: dict[str, int] = {}
    stream_end_ms = max(r.manifest.window_end_ms for r in refs)
    # A day's model is trained once the stream has passed its release time (midnight + delay): so not for a partial
    # last day, nor for the last day's few minutes after midnight, whose model would serve nothing.
    for day_ms in [d for d in days if d + DAY_MS + delay_ms < stream_end_ms]:
        started = time.perf_counter()
        result = train_full(models_settings, day_name(day_ms), from_scratch=day_ms == first_day)
        seconds = time.perf_counter() - started
        released_at[result.ref.version] = day_ms + DAY_MS + delay_ms + int(seconds * 1000)
        recall = result.metrics.get("exact", {}).get("recall@50", math.nan)
        report(f"  full model {result.ref.version}: {result.samples:,} samples in {seconds:.1f} s, gate Recall@50 {recall:.4f}")
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
    k = max(replay.ks)

    def flush_units() -> None:
        if pending_units:
            for unit, retrieved in zip(pending_units, state.served.retrieve(pending_units, k, item_cache, replay.exclude_seen)):
                state.scores[unit.index] = score_unit(retrieved, unit, replay.ks)
        pending_units.clear()

    for now, kind, payload in timeline:
        if state.trainer is not None:
            _advance(state, now, flush_units, replay)
        if kind == _UNIT:
            pending_units.append(payload)
        elif kind == _FULL_RELEASE and state.arm.full_models:
            flush_units()
            _take_full_release(state, payload, now, replay)
        elif kind == _BATCH_READY and state.trainer is not None:
            state.queue.append((payload, now))
    if state.trainer is not None:
        _advance(state, math.inf, flush_units, replay, train=False)
    flush_units()


def _advance(state: _ArmState, now: float, flush_units: Callable[[], None], replay: _Replay, train: bool = True) -> None:
    """Run the online trainer's clock up to ``now``: train each queued batch that it starts by then (a batch starts
    once ready and the trainer is free), publishing at every tick before that start; then the ticks up to ``now``."""
    trainer = state.trainer
    while train and state.queue:
        ref, ready = state.queue[0]
        start = max(ready, state.busy_until_ms)
        if start > now:
            break
        state.queue.pop(0)
        if ref.window_start_ms < trainer.next_window_ms or batch_key(ref) in trainer.trained_recent:
            continue  # behind the trainer's position (a re-base's catch-up trained it)
        _publish_ticks(state, start, flush_units, replay)
        _train(state, ref, start, replay)
    _publish_ticks(state, now, flush_units, replay)


def _take_full_release(state: _ArmState, model_ref, now: int, replay: _Replay) -> None:
    """A full release reaches an arm that follows full models: the full model is served at once (the publisher
    releases it), and the online trainer re-bases (its load timed on its clock) and queues its catch-up: the batches
    since the model's data end that are ready now."""
    _learnt_by_full(state, model_ref, replay.released_at[model_ref.version], replay)
    state.served = Served(*_full_state(model_ref))
    if state.trainer is None:
        return
    # Learnt on the old base and not published: the catch-up learns them again and they count from there.
    for key, _, _ in state.unpublished:
        state.learnt.discard(key)
    state.unpublished, state.before_inflight, state.queue = [], None, []
    _reveal(model_ref, state.trainer.settings)
    started_ms = max(now, state.busy_until_ms)
    wall = time.perf_counter()
    state.trainer.rebase_if_newer()
    state.busy_until_ms = started_ms + (time.perf_counter() - wall) * 1000
    state.base_items = len(state.trainer.model.catalogue)
    state.queue = [(ref, now) for ref in state.trainer.pending() if ref.manifest.window_end_ms + replay.lateness_ms <= now]


def _result(state: _ArmState, units: list[Unit]) -> ArmResult:
    return ArmResult(
        state.arm.name,
        [state.scores[u.index] for u in units],
        units,
        np.concatenate(state.freshness) if state.freshness else np.zeros(0),
    )


def _train(state: _ArmState, ref: BatchRef, start_ms: float, replay: _Replay) -> None:
    trainer = state.trainer
    before = trainer.model.user_tower.id_embedding.detach().clone() if state.arm.publish_interval_ms else None
    started = time.perf_counter()
    samples = replay.clicks_of(ref)
    trainer.learn_batch(ref, samples)
    finished = start_ms + (time.perf_counter() - started) * 1000
    state.busy_until_ms = finished
    state.before_inflight = (finished, before) if before is not None else None
    clicks = samples.event_time_ms.astype(np.int64)
    key = batch_key(ref)
    if key in state.learnt:  # caught up again after a re-base: its clicks reached serving already
        clicks = clicks[:0]
    state.learnt.add(key)
    state.unpublished.append((key, clicks[clicks >= state.since_ms], finished))


def _publish_ticks(state: _ArmState, now: float, flush_units: Callable[[], None], replay: _Replay) -> None:
    """Publish at every tick up to ``now`` at which something new was finished: the rows learnt by the tick (those
    before a batch still in training then), the items the release serves."""
    interval = state.arm.publish_interval_ms
    if interval is None:
        return
    while state.unpublished:
        tick = next_tick(min(t for _, _, t in state.unpublished), interval)
        if tick > now:
            return
        flush_units()  # units before the tick see the previous release
        ready = [e for e in state.unpublished if e[2] <= tick]
        state.unpublished = [e for e in state.unpublished if e[2] > tick]
        for _, clicks, _ in ready:
            state.freshness.append((tick - clicks) / 1000)
        model = state.trainer.model
        inflight = state.before_inflight
        table = inflight[1] if inflight is not None and inflight[0] > tick else model.user_tower.id_embedding.detach().clone()
        items = len(model.catalogue) if replay.new_item_vectors else state.base_items
        new_clicks = state.trainer.learner.new_item_clicks.snapshot(items) if replay.new_item_vectors and replay.new_item_clicks else None
        state.served = Served(model, table, items, state.base_items, replay.new_item_id_row, new_clicks, replay.new_item_click_prior)


def _learnt_by_full(state: _ArmState, model_ref, released_ms: int, replay: _Replay) -> None:
    """Freshness of the clicks a full model learnt, for the arm that only has full models."""
    if state.trainer is not None:
        return  # the online trainer published them earlier
    day_ms = day_start_ms(date.fromisoformat(model_ref.day))
    for ref in replay.refs:
        if day_ms <= ref.window_start_ms < day_ms + DAY_MS:
            clicks = replay.clicks_of(ref).event_time_ms.astype(np.int64)
            state.freshness.append((released_ms - clicks[clicks >= state.since_ms]) / 1000)


def _full_state(model_ref) -> tuple[object, torch.Tensor, int]:
    model = load_full_model(model_ref).model
    model.eval()
    return model, model.user_tower.id_embedding.detach().clone(), len(model.catalogue)


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
