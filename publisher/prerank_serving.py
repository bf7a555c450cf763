"""What the service pre-ranks with: the pre-ranker of the served full
release, its item cache and the published statistics, and one request.

Loaded with the full release (``load_prerank``; None when the release has
no pre-ranker): the model from ``prerank.pt``, the item cache filled from
the precomputed ``prerank_item_rows.npy`` (most wanted first: catalogue
order, at most ``prerank.item_cache_size`` items; the rest are computed on
a miss), the statistics snapshots of ``statistics.npz``; each embeddings
release on top brings the pre-ranker's online user rows (``with_user_rows``)
and a newer statistics snapshot (``with_statistics``). Scoring holds a
lock (the scorer's buffers are shared); unknown candidates are scored as
cold items and reported.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
import copy
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from freshtower.publisher.item_cache import CacheStats, CatalogueItems, ItemTowerCache
from freshtower.publisher.prerank_release import PRERANK_NOTE
from freshtower.publisher.statistics_feed import STATISTICS_FILE, StatisticsSnapshots, load_statistics
from freshtower.publisher.prerank_rows import PRERANK_ROW_EVENT_TIME, PRERANK_USER_IDS, PRERANK_USER_ROWS
from freshtower.publisher.prerank_scorer import PrerankScorer, PrerankScores
from freshtower.publisher.releases import Release, ReleaseError
from freshtower.publisher.user_tower import FeatureError
from freshtower.trainer.prerank_model import ThreeTowerPreranker

from freshtower.core.settings import PrerankConfig, settings_from_record
from freshtower.core.statistics import CountsSnapshot

Timing = Callable[[str, float], None]


@dataclass(frozen=True)
class PrerankState:
    model_version: str  # the pre-ranker's version (models/prerank/<day>.<n>)
    day: str
    data_end_ms: int
    statistics_as_of_ms: int | None  # None: the release carried no statistics (all read 0)
    model: ThreeTowerPreranker
    cache: ItemTowerCache
    scorer: PrerankScorer
    lock: threading.Lock
    max_candidates: int
    # the online user ID rows of the embeddings releases on top (``with_user_rows``)
    user_event_time_ms: Mapping[str, int] = field(default_factory=dict)  # user -> newest ranking sample learnt online
    rows_version: str | None = None  # the embeddings release they came with (None: the daily model's rows)

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()


def _empty(channels: int) -> CountsSnapshot:
    return CountsSnapshot(0, np.zeros(0, np.uint64), np.zeros((0, 2, channels), np.int64))


def load_prerank(release: Release, config: PrerankConfig, on_timing: Timing | None = None) -> PrerankState | None:
    """The pre-ranker of a full release (None: it has none). ``config``: the
    service's ``[prerank]`` (cache size, most candidates)."""
    if PRERANK_NOTE not in release.manifest.files:
        return None
    note = json.loads(release.file(PRERANK_NOTE).read_text())
    trained = settings_from_record(note["config"])
    model = ThreeTowerPreranker(trained.model, trained.prerank, trained.vocabulary)
    payload = torch.load(release.file("prerank.pt"), weights_only=True)
    model.import_state(payload["model"])
    model.eval()
    ids = json.loads(release.file("prerank_item_ids.json").read_text())
    rows = torch.from_numpy(np.load(release.file("prerank_item_rows.npy")))
    codes = np.load(release.file("prerank_item_codes.npy"))
    if rows.shape[0] != len(ids) or len(codes) != len(ids):
        raise ReleaseError(f"release {release.version}: {len(ids)} pre-ranker item IDs, rows {tuple(rows.shape)}, {len(codes)} codes")
    cache = ItemTowerCache(config.item_cache_size, model.cold_item_row(), CatalogueItems(model), on_timing=on_timing)
    cache.fill(ids, rows, codes)
    if STATISTICS_FILE in release.manifest.files:
        snapshots = _statistics(release)
        items, by_category, by_user, as_of = snapshots.items, snapshots.by_category, snapshots.by_user, snapshots.as_of_ms
    else:
        items, by_category, by_user, as_of = _empty(2), _empty(2), _empty(1), None
    scorer = PrerankScorer(model, cache, items, (by_category, by_user), config.max_candidates, on_timing=on_timing)
    return PrerankState(note["model_version"], note["day"], int(note["data_end_ms"]), as_of, model, cache, scorer, threading.Lock(),
                        config.max_candidates)


def _statistics(release: Release) -> StatisticsSnapshots:
    """The statistics a release carries, checked for shape (a ``ReleaseError`` names the file)."""
    where = f"release {release.version}: {STATISTICS_FILE}"
    try:
        snapshots = load_statistics(release.file(STATISTICS_FILE))
    except (KeyError, ValueError, OSError) as error:
        raise ReleaseError(f"{where}: cannot read: {error}") from error
    for name, channels in (("items", 2), ("by_category", 2), ("by_user", 1)):
        part: CountsSnapshot = getattr(snapshots, name)
        if part.keys.ndim != 1 or part.counts.shape != (len(part.keys), 2, channels):
            raise ReleaseError(f"{where}: {name} holds keys {part.keys.shape} and counts {part.counts.shape}, expected (k,) and (k, 2, {channels})")
    stated = getattr(release.manifest, "statistics_as_of_ms", None)
    if stated is not None and stated != snapshots.as_of_ms:
        raise ReleaseError(f"{where}: as of {snapshots.as_of_ms} ms, but the manifest says {stated} ms")
    return snapshots


def with_statistics(state: PrerankState, release: Release) -> PrerankState:
    """``state`` scoring with the statistics snapshot an embeddings release
    carries, which replaces the one it had (a complete snapshot, not an
    addition); ``state`` itself when the release carries none."""
    if getattr(release.manifest, "statistics_as_of_ms", None) is None:
        return state
    snapshots = _statistics(release)
    scorer = state.scorer.with_statistics(snapshots.items, (snapshots.by_category, snapshots.by_user))
    return replace(state, scorer=scorer, statistics_as_of_ms=snapshots.as_of_ms)


def with_user_rows(state: PrerankState, release: Release) -> PrerankState:
    """``state`` with the pre-ranker user rows ``release`` carries written
    over its user table (a copy: ``state`` may be serving requests); the
    item cache, scorer buffers and lock are shared. ``state`` itself when
    the release carries none for this pre-ranker."""
    summary = getattr(release.manifest, "prerank", None)
    if summary is None or summary.model_version != state.model_version:
        return state
    where = f"release {release.version}"
    user_ids = json.loads(release.file(PRERANK_USER_IDS).read_text())
    rows = np.load(release.file(PRERANK_USER_ROWS))
    times = np.load(release.file(PRERANK_ROW_EVENT_TIME))
    id_dim = state.model.user_tower.id_embedding.shape[1]
    if rows.shape != (len(user_ids), id_dim) or times.shape != (len(user_ids),):
        raise ReleaseError(f"{where}: pre-ranker user rows {rows.shape}, event times {times.shape} for {len(user_ids)} IDs x {id_dim}")
    model = copy.copy(state.model)  # shallow: towers other than the user tower are shared
    model._modules = dict(state.model._modules)
    model.user_tower = copy.deepcopy(state.model.user_tower)
    vocabulary = copy.deepcopy(state.model.user_ids)
    vocabulary.min_count = 1  # the release's users have rows: admit them at once
    vocabulary.observe(user_ids, 0)
    model.user_ids = vocabulary
    table = model.user_tower.id_embedding
    grown = table.data[:1].expand(max(len(vocabulary), table.shape[0]), id_dim).clone()
    grown[: table.shape[0]] = table.data
    grown[torch.from_numpy(vocabulary.lookup(user_ids))] = torch.from_numpy(rows)
    table.data = grown
    event_times = dict(state.user_event_time_ms)
    event_times.update(zip(user_ids, times.tolist()))
    return replace(state, model=model, scorer=state.scorer.with_user_tower(model.user_tower), user_event_time_ms=event_times,
                   rows_version=release.version)


@dataclass(frozen=True)
class PrerankAnswer:
    item_ids: list[str]  # the kept candidates, best first
    logits: list[float]
    unknown_ids: list[str]  # candidates the pre-ranker does not know (scored as cold items)
    cold_start: bool  # the pre-ranker has no row of this user
    hits: int
    misses: int
    statistics_as_of_ms: int | None
    seconds: dict[str, float]
    user_event_time_ms: int | None = None  # the newest ranking sample the user's row learnt online (None: the daily model's row)


def _user_inputs(model: ThreeTowerPreranker, user_id: str, features: Mapping[str, object]):
    known = set(model.user_categorical) | set(model.user_numeric)
    unknown = sorted(set(features) - known)
    if unknown:
        raise FeatureError(f"unknown user features {unknown}; the pre-ranker knows {sorted(known)}")
    categorical = {}
    for name in model.user_categorical:
        value = features.get(name, "")
        if not isinstance(value, str):
            raise FeatureError(f"user feature {name!r} is categorical: send a string, not {type(value).__name__}")
        categorical[name] = [value]
    numeric = np.zeros((1, len(model.user_numeric)), dtype=np.float32)
    for j, name in enumerate(model.user_numeric):
        value = features.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise FeatureError(f"user feature {name!r} is numeric: send a finite number, not {value!r}")
        numeric[0, j] = value
    return model.user_inputs([user_id], categorical, numeric)


def prerank(state: PrerankState, user_id: str, features: Mapping[str, object], candidate_ids: Sequence[str], keep: int | None) -> PrerankAnswer:
    """Score ``candidate_ids`` for one user and keep the ``keep`` best (all when None).
    Raises ``FeatureError`` for features that do not fit, ``ValueError`` past ``max_candidates``."""
    inputs = _user_inputs(state.model, user_id, features)
    cold_start = int(inputs.id_rows[0]) == 0
    with state.lock:
        scores: PrerankScores = state.scorer.score(user_id, inputs, list(candidate_ids), keep)
    order = scores.order.tolist()
    return PrerankAnswer(
        item_ids=[candidate_ids[i] for i in order],
        logits=scores.logits[order].astype(float).tolist(),
        unknown_ids=scores.unknown_ids,
        cold_start=cold_start,
        hits=scores.hits,
        misses=scores.misses,
        statistics_as_of_ms=state.statistics_as_of_ms,
        seconds=scores.seconds,
        user_event_time_ms=state.user_event_time_ms.get(user_id),
    )
