"""``freshtower publish``: the trainers' output -> releases.

Each tick (``Publisher.tick``, every ``publisher.poll_seconds``):

1. **Full release**, when ``models/full/LATEST`` names a full model that
   was never released: user tower (``user_tower.pt``), all user ID
   embeddings, item vectors and the Faiss index built from them (exact
   below ``exact_index_below`` items; above, the IVF-Flat or HNSW index that
   meets ``index_recall_target`` at the lowest p99 on the check users,
   ``index_choice.py``).
2. **Embeddings release**, when one is due (``due.delta_due``: every
   ``publish_interval_seconds`` of wall time, or of event time with
   ``clock = "event"`` for replays; at once after a full release): the user
   ID rows that changed since the active release (``due.rows_to_publish``), read
   from the online trainer's checkpoint (one atomic file, so one consistent
   state; one per user partition when the trainer is scaled out,
   ``online_checkpoints``), with the newest click event time each row
   learnt from.
3. Released rows go to the compacted ``user-embeddings`` topic
   (``embedding_topic.py``), after the release is active; ``kafka.json``
   remembers how far that got, so a failure is retried next tick.

Checks before anything becomes active (``checks.py``): no NaN/inf, the
right shapes, a full model's holdout Recall@50 no more than
``max_recall_drop`` below the active full release's (a model whose holdout,
the next day's first minutes, holds no click, as for a stream's last day,
has nothing to compare and skips this one), and the new index's
recall@100 against exact search at least ``min_index_recall``. A refused
release is reported with its reason; the active one stays.

What is due is a pure function of the active release, the online
checkpoints, the clock and the settings (``due.what_is_due``, from
``full_release_due`` and ``embeddings_release_due``): the publisher acts on
it, and ``freshtower run`` asks it whether anything is left to publish.

Deltas build on the *active* release: after a rollback the next delta
carries every row changed since the release rolled back to. A rolled-back
full model is not released again; an online checkpoint that follows
another full model than the active one publishes nothing until they match.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from freshtower.publisher.checks import ReleaseRefused, check_finite, check_index_recall, check_recall_drop, check_shape, check_unique, gate_baseline
from freshtower.publisher.due import EmbeddingsReleaseDue, embeddings_release_due, full_release_due
from freshtower.publisher.embedding_topic import EmbeddingTopic
from freshtower.publisher.prerank_release import PRERANK_NOTE, write_prerank_files
from freshtower.publisher.prerank_rows import (
    PRERANK_ROW_EVENT_TIME, PRERANK_USER_IDS, PRERANK_USER_ROWS, PrerankRowsPart, prerank_rows,
)
from freshtower.publisher.statistics_feed import STATISTICS_FILE, StatisticsFeed, StatisticsSnapshots, statistics_bytes
from freshtower.publisher.new_items import FrozenItemTower, NewItemVectors, new_catalogue_items
from freshtower.trainer.new_item_clicks import blend_with_clicks, clicks_of
from freshtower.publisher.releases import ActiveChanged, Release, ReleaseError
from freshtower.publisher.release_store import open_release_store
from freshtower.publisher.user_tower import ServingUserTower, export_user_tower, exported_tensors
from freshtower.trainer.artifacts import (
    ArtifactError,
    FullModelRef,
    LoadedModel,
    full_models_dir,
    latest_full_model,
    load_full_model,
    mark_refused,
    read_manifest,
    refusal,
)
from freshtower.publisher.index_choice import IndexChoice, choose_index
from freshtower.trainer.retrieval import ExactRetriever, FaissRetriever, IndexSettings, recall_against_exact

from freshtower.core.contracts import (
    CheckpointRead,
    ContractError,
    Dims,
    EmbeddingsReleaseManifest,
    EventTimeRange,
    FullReleaseManifest,
    IndexCandidate,
    IndexSummary,
    ModelSummary,
    NewItems,
    RecallChecks,
    ReleaseManifest,
)
from freshtower.core.contracts.release_manifest import NEW_ITEM_IDS, NEW_ITEM_VECTORS
from freshtower.core.contracts.online_checkpoint import read_online_checkpoint
from freshtower.core.batches import BatchFormatError
from freshtower.core.settings import PublisherConfig, Settings
from freshtower.core.storage import StorageError, write_file, writing

log = logging.getLogger(__name__)

INDEX_CHECK_K = 100  # recorded as IndexSummary.recall_at_100_vs_exact
INDEX_CHOICE_SETTINGS = (  # the publisher settings the index choice depends on, recorded in the manifest
    "index_kinds", "index_recall_target", "hnsw_max_items", "ivf_lists", "ivf_max_nprobe", "ivf_train_per_list", "ivf_train_iterations",
)
KAFKA_NOTE = "kafka.json"
RECALL_K = 50  # the holdout Recall@K a full model is checked on

StageCallback = Callable[[str, str], None]  # (stage, detail): "file" name, "sealed" version, ...


@dataclass
class PublishOutcome:
    kind: Literal["full", "embeddings"]
    status: Literal["published", "refused", "skipped"]
    reason: str
    version: str | None = None
    rows: int = 0
    seconds: float = 0.0


# --- reading the inputs -------------------------------------------------------------


_CHECKPOINT = re.compile(r"^checkpoint(-[0-9]+-of-([0-9]+))?\.pt$")


def online_checkpoints(online_dir: Path) -> dict[str, Path]:
    """The online trainers' checkpoints by file name: ``checkpoint.pt``, or,
    when the trainer is scaled out over user partitions, one
    ``checkpoint-<k>-of-<n>.pt`` per partition (those of the largest n win;
    a single checkpoint left from before scaling out is then ignored).
    Partitions own disjoint users, so their rows are simply put together."""
    if not online_dir.is_dir():
        return {}
    found = {p.name: p for p in online_dir.iterdir() if _CHECKPOINT.fullmatch(p.name)}
    counts = {int(m.group(2)) for name in found if (m := _CHECKPOINT.fullmatch(name)).group(2)}
    if counts:
        return {name: path for name, path in sorted(found.items()) if name.endswith(f"-of-{max(counts)}.pt")}
    return found


@dataclass
class FullReleaseInputs:
    """What a full release is built from (``full_release_inputs`` reads a model)."""

    model_version: str
    tower: dict  # export_user_tower(...)
    user_ids: list[str]  # row -> ID; "" for the default row 0 and free rows
    user_table: np.ndarray  # (R, id_dim) float32
    item_ids: list[str]
    item_vectors: np.ndarray  # (N, output_dim) float32, unit length
    holdout_recall: float | None
    data_start_ms: int
    data_end_ms: int
    newest_click_ms: int | None  # recorded by the full trainer; None if it saw no click
    model: ModelSummary  # the model manifest, in brief


def full_release_inputs(loaded: LoadedModel) -> FullReleaseInputs:
    model, manifest = loaded.model, loaded.ref.manifest
    rows = len(model.user_ids)
    return FullReleaseInputs(
        model_version=loaded.ref.version,
        tower=export_user_tower(model),
        user_ids=["" if r is None else r for r in model.user_ids.row_ids()],
        user_table=model.user_tower.id_embedding.detach()[:rows].numpy().astype(np.float32),
        item_ids=list(model.catalogue.ids),
        item_vectors=model.catalogue_vectors().numpy().astype(np.float32),
        holdout_recall=manifest.holdout_recall(RECALL_K),
        data_start_ms=manifest.data_start_ms,
        data_end_ms=manifest.data_end_ms,
        newest_click_ms=manifest.newest_click_event_time_ms,
        model=ModelSummary(
            version=manifest.version, day=manifest.day, parent=manifest.parent, created_at=manifest.created_at, metrics=manifest.metrics
        ),
    )


def check_full_inputs(inputs: FullReleaseInputs) -> None:
    """NaN/inf, shapes and duplicate IDs of a full release's arrays."""
    id_dim, output_dim = int(inputs.tower["id_dim"]), int(inputs.tower["output_dim"])
    check_shape("user_embeddings", inputs.user_table, len(inputs.user_ids), id_dim)
    check_shape("item_vectors", inputs.item_vectors, len(inputs.item_ids), output_dim)
    if not inputs.item_ids:
        raise ReleaseRefused("the catalogue is empty: nothing to retrieve")
    check_finite({**{f"user_tower.{k}": v for k, v in exported_tensors(inputs.tower).items()}, "user_embeddings": inputs.user_table})
    check_finite({"item_vectors": inputs.item_vectors})
    check_unique("user_ids", [u for u in inputs.user_ids if u])
    check_unique("item_ids", inputs.item_ids)


def index_recall(index: FaissRetriever, item_vectors: np.ndarray, queries: np.ndarray, k: int = INDEX_CHECK_K) -> float:
    """Recall@k of ``index`` against the exact oracle for ``queries``."""
    k = min(k, len(item_vectors))
    _, approximate = index.search(queries, k)
    _, exact = ExactRetriever(item_vectors, chunk=16).search(queries, k)  # 16 x N score blocks: bounded memory at 1M items
    return recall_against_exact(approximate, exact)


def index_summary(choice: IndexChoice, config: PublisherConfig, check_queries: int) -> IndexSummary:
    """What the manifest records of the index a full release serves and of the candidates it was picked from."""
    parameter = choice.index.search_parameter
    return IndexSummary(
        kind=choice.index.kind,
        settings=asdict(IndexSettings.from_publisher(config)),  # what serving builds a new-item index with
        choice_settings={name: getattr(config, name) for name in INDEX_CHOICE_SETTINGS},
        build_seconds=choice.build_seconds,
        recall_at_100_vs_exact=choice.recall,
        check_queries=check_queries,
        recall_target=config.index_recall_target,
        search_parameter=None if parameter is None else parameter[0],
        search_value=None if parameter is None else parameter[1],
        p99_ms=choice.p99_ms,
        choice_seconds=choice.choice_seconds,
        candidates=tuple(
            IndexCandidate(
                kind=c.kind, build_seconds=c.build_seconds, parameter=c.parameter, value=c.value,
                recall_at_100_vs_exact=c.recall, p99_ms=c.p99_ms, meets_target=c.meets_target,
            )
            for c in choice.candidates
        ),
    )


def check_queries(inputs: FullReleaseInputs, count: int, seed: int = 0) -> np.ndarray:
    """User vectors of a seeded sample of users (features unknown): queries
    from the region serving searches, for the index check."""
    tower = ServingUserTower(inputs.tower)
    rows = np.random.default_rng(seed).integers(0, len(inputs.user_table), size=count)
    unknown = {name: [""] * count for name in tower.categorical}
    return tower.vectors(inputs.user_table[rows], unknown, np.zeros((count, len(tower.numeric)), np.float32))


# --- the publisher ---------------------------------------------------------------------


@dataclass(frozen=True)
class TakenRows:
    """The retrieval rows an embeddings release takes from the online checkpoints."""

    user_ids: list[str]
    vectors: np.ndarray  # (n, id_dim) float32
    event_times: np.ndarray  # (n,) int64 ms: the newest click each row learnt from
    steps: dict[str, int]  # checkpoint name -> step released (the active release's, updated)
    read: dict[str, CheckpointRead]
    resync: list[str]  # checkpoints whose trainer restarted from its base


def taken_rows(active: Release, due: EmbeddingsReleaseDue) -> TakenRows:
    steps = dict(active.manifest.online_steps)  # checkpoint name -> step already released
    ids, vectors, times, resync, read = [], [], [], [], {}
    for name, taken in sorted(due.taken.items()):
        checkpoint, rows = taken.checkpoint, taken.rows
        if taken.resync:
            resync.append(name)
        row_ids = checkpoint.user_ids.row_ids
        index = torch.from_numpy(rows)
        ids += [row_ids[r] for r in rows.tolist()]
        vectors.append(checkpoint.user_table[index].numpy().astype(np.float32))
        times.append(checkpoint.row_event_time_ms[index].numpy().astype(np.int64))
        steps[name] = checkpoint.step
        read[name] = CheckpointRead(step=checkpoint.step, since=taken.since, rows=len(rows), written_at=checkpoint.written_at)
    if not ids:
        return TakenRows([], np.zeros((0, 0), np.float32), np.zeros(0, np.int64), steps, read, resync)
    return TakenRows(ids, np.concatenate(vectors), np.concatenate(times), steps, read, resync)


def _served_statistics_as_of(chain: list[Release], full_note: dict | None) -> int | None:
    """The time of the newest statistics snapshot in a chain (None: none):
    an embeddings release carries a newer one or none."""
    for link in reversed(chain[1:]):
        as_of = getattr(link.manifest, "statistics_as_of_ms", None)
        if as_of is not None:
            return as_of
    return None if full_note is None else full_note.get("statistics_as_of_ms")


@dataclass(frozen=True)
class DeltaExtras:
    """What an embeddings release carries beside the retrieval rows (None: not this time)."""

    new_items: NewItemVectors | None
    prerank: PrerankRowsPart | None
    statistics: StatisticsSnapshots | None


class Publisher:
    """Publishes releases into the release store (``publisher.release_store``). Use as a context
    manager: it holds the store's publisher lock and clears what a killed
    predecessor left half-done."""

    def __init__(self, settings: Settings, *, topic: EmbeddingTopic | None = None, on_stage: StageCallback | None = None):
        self.settings = settings
        self.config = settings.publisher
        self.store = open_release_store(settings)
        self.topic = topic
        self.on_stage = on_stage or (lambda stage, detail: None)
        self.refused_models: dict[str, str] = {}  # full model version -> why (not retried by this process)
        self.item_tower = FrozenItemTower(full_models_dir(settings))  # embeds new items for embeddings releases
        self._full_items: tuple[str, frozenset[str]] | None = None  # (full release, its item IDs)
        self.statistics = StatisticsFeed(settings.batches_dir)  # the statistics features releases carry, kept current
        self._lock = None
        # Wall clock: when changed rows wait for the interval to pass, the
        # moment it does (``run`` ticks then, not a whole poll later).
        self.delta_due_at_s: float | None = None
        self._retention_due = False  # a release was activated: ``apply_retention`` has work

    def __enter__(self) -> Publisher:
        self._lock = self.store.publisher_lock()
        self._lock.__enter__()
        removed = self.store.clean_incomplete()
        if removed:
            log.warning("removed what an interrupted publisher left: %s", removed)
        return self

    def __exit__(self, *exc) -> None:
        if self.topic is not None:
            self.topic.close()
        if self._lock is not None:
            self._lock.__exit__(*exc)
            self._lock = None

    # --- one tick ---------------------------------------------------------------

    def tick(self, now_s: float | None = None, *, force_delta: bool = False, report=None) -> list[PublishOutcome]:
        """Full release if a new full model is there, then a delta if due (or
        if there are changed rows at all, with ``force_delta``), then the
        topic. ``now_s`` is wall time (seconds), passed in for tests.
        ``report(outcome)`` is called for each outcome before the rows go to
        the topic: the release is active by then, and its announcement (the
        service swaps on it) must not wait for the topic."""
        now_s = time.time() if now_s is None else now_s
        outcomes = [self.publish_full_if_new(now_s), self.publish_delta_if_due(now_s, force=force_delta)]
        for outcome in outcomes:
            if report:
                report(outcome)
        self.apply_retention()
        self.send_pending_to_topic()
        return outcomes

    def apply_retention(self) -> list[str]:
        """Remove releases beyond ``keep_releases`` (never the active chain),
        once something was activated since the last time; the removed versions."""
        if not self._retention_due:
            return []
        self._retention_due = False
        if len(self.store.versions()) <= self.config.keep_releases:
            return []
        removed = self.store.retain(self.config.keep_releases)
        if removed:
            log.info("retention removed %s", removed)
        return removed

    def run(
        self,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        max_releases: int | None = None,
        report=None,
        wait: Callable[[float], bool] | None = None,
    ) -> int:
        """Tick until ``should_stop()`` (or ``max_releases`` published).
        Between ticks it waits the period, or until ``wait(seconds)`` returns
        True (a ``Wakeup`` on the checkpoint announcements): then it ticks at once."""
        if wait is None:
            wait = lambda seconds: bool(time.sleep(seconds))  # noqa: E731
        published = 0
        while not should_stop():
            try:
                outcomes = self.tick(report=report)
            except (ReleaseError, ArtifactError, ContractError, OSError) as error:
                # e.g. a checkpoint or model being replaced, a full disk: keep the
                # active release, say why, try again next period
                log.error("publisher tick failed, the active release stays: %s", error)
                outcomes = []
            for outcome in outcomes:
                published += outcome.status == "published"
            if max_releases is not None and published >= max_releases:
                break
            # The poll period, or less when changed rows become due sooner; a
            # checkpoint announcement ends the wait at once. (Not the interval
            # itself: at an interval of milliseconds each tick, which reads
            # every checkpoint, would spin.)
            period = self.config.poll_seconds
            if self.delta_due_at_s is not None:
                period = min(period, max(0.0, self.delta_due_at_s - time.time()))
            deadline = time.monotonic() + period
            while not should_stop() and time.monotonic() < deadline:
                if wait(max(0.0, min(0.2, deadline - time.monotonic()))):
                    break  # a new checkpoint was announced
        return published

    # --- full releases ---------------------------------------------------------------

    def publish_full_if_new(self, now_s: float | None = None) -> PublishOutcome:
        latest = latest_full_model(full_models_dir(self.settings))
        if latest is None:
            return PublishOutcome("full", "skipped", f"no full model under {full_models_dir(self.settings)} yet")
        refused = self.refused_models.get(latest.version) or refusal(latest)
        due = full_release_due(latest.version, activations=self.store.activations(), refused=refused)
        if not due.due:
            return PublishOutcome("full", "skipped", due.reason)
        return self.publish_full(latest, now_s=now_s)

    def publish_full(self, ref: FullModelRef, *, now_s: float | None = None, activate: bool = True) -> PublishOutcome:
        started = time.perf_counter()
        try:
            inputs = full_release_inputs(load_full_model(ref))
        except (ArtifactError, OSError, KeyError, ValueError) as error:
            return self._refuse_full(ref.version, f"cannot read full model {ref.version} at {ref.path}: {error}", started)
        return self.publish_full_inputs(inputs, now_s=now_s, activate=activate, started=started)

    def publish_full_inputs(
        self, inputs: FullReleaseInputs, *, now_s: float | None = None, activate: bool = True, started: float | None = None
    ) -> PublishOutcome:
        """Check, index, write, seal and (by default) activate a full release.
        ``now_s``: wall time recorded as its creation time (default: now)."""
        started = time.perf_counter() if started is None else started
        active = self.store.active()
        try:
            choice, queries, active_recall, baseline = self._check_full(inputs, self._chain_root(active))
        except ReleaseRefused as error:
            return self._refuse_full(inputs.model_version, str(error), started)
        index = choice.index
        version = self.store.next_version("full")
        staging = self.store.staging_dir(version)
        self._write_full_files(staging, inputs, index)
        manifest = FullReleaseManifest(
            version=version,
            parent=None if active is None else active.version,
            full_version=version,
            model_version=inputs.model_version,
            created_at=time.time() if now_s is None else now_s,
            online_steps={},  # the full model's rows are every online trainer's step 0
            checkpoint_event_time_ms=inputs.data_end_ms,
            event_time=EventTimeRange(start_ms=inputs.data_start_ms, end_ms=inputs.data_end_ms),
            # The newest click the full model learnt from, as its trainer
            # recorded it; without one, only bound it by data_end_ms.
            newest_click_event_time_ms=inputs.newest_click_ms if inputs.newest_click_ms else inputs.data_end_ms - 1,
            newest_click_is_bound=not inputs.newest_click_ms,
            rows={"user_embeddings": len(inputs.user_ids), "items": len(inputs.item_ids)},
            dims=Dims(id_dim=int(inputs.tower["id_dim"]), output_dim=int(inputs.tower["output_dim"])),
            index=index_summary(choice, self.config, len(queries)),
            checks=RecallChecks(
                holdout_recall_at_50=inputs.holdout_recall, active_holdout_recall_at_50=active_recall, max_recall_drop=self.config.max_recall_drop,
                baseline_recall_at_50=baseline.recall, baseline=baseline.source, holdout_clicks=inputs.model.metrics.get("clicks"),
            ),
            model=inputs.model,
            config=self.settings.as_record(),
            files={},  # listed by the store when it seals
        )
        return self._seal_and_activate(staging, manifest, active, activate, len(inputs.user_ids), started)

    def _check_full(self, inputs: FullReleaseInputs, active_full):
        """The full release's gates: its inputs, its holdout recall against
        the baseline, and the index it chose. Returns (index choice, check
        queries, the active release's holdout recall, the baseline); raises
        ``ReleaseRefused``."""
        check_full_inputs(inputs)
        active_recall = None if active_full is None else _holdout_recall(active_full.manifest)
        metrics = inputs.model.metrics
        baseline = gate_baseline(metrics, None if active_full is None else active_full.manifest.model.version, active_recall)
        if metrics.get("clicks") != 0:  # no holdout clicks (a stream's last day): nothing to compare
            check_recall_drop(
                inputs.holdout_recall, baseline.recall, self.config.max_recall_drop, clicks=metrics.get("clicks"),
                min_clicks=self.config.min_gate_clicks, against=baseline.against,
            )  # fmt: skip
        self.on_stage("index", f"{len(inputs.item_ids)} items")
        queries = check_queries(inputs, self.config.index_check_queries, self.settings.training.seed)
        choice = choose_index(inputs.item_vectors, queries, self.config, k=INDEX_CHECK_K, seed=self.settings.training.seed)
        check_index_recall(choice.recall, self.config.min_index_recall, INDEX_CHECK_K)
        return choice, queries, active_recall, baseline

    def _write_full_files(self, staging: Path, inputs: FullReleaseInputs, index) -> None:
        """The release's files into ``staging``, the pre-ranker's with them
        when it can be read (one that cannot never stops the retrieval
        release; a full disk or a read-only store does)."""
        self._write(staging, "user_tower.pt", lambda h: torch.save(inputs.tower, h))
        self._write(staging, "user_embeddings.npy", lambda h: np.save(h, inputs.user_table))
        self._write(staging, "user_ids.json", lambda h: h.write(json.dumps(inputs.user_ids).encode()))
        self._write(staging, "item_vectors.npy", lambda h: np.save(h, inputs.item_vectors))
        self._write(staging, "item_ids.json", lambda h: h.write(json.dumps(inputs.item_ids).encode()))
        self._write(staging, "index.faiss", index.save, by_path=True)
        try:
            prerank = write_prerank_files(staging, self.settings, on_file=lambda name: self.on_stage("file", name), statistics=self.statistics)
        except StorageError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except (ArtifactError, OSError, KeyError, ValueError) as error:
            log.warning("full release without a pre-ranker: %s", error)
            prerank = None
        if prerank is not None:
            log.info("full release carries pre-ranker %s", prerank["model_version"])

    def _refuse_full(self, model_version: str, reason: str, started: float) -> PublishOutcome:
        self.refused_models[model_version] = reason
        model_dir = full_models_dir(self.settings) / model_version
        if (model_dir / "manifest.json").is_file():
            mark_refused(read_manifest(model_dir), reason)  # the online trainer keeps following the served model
        log.warning("refused full model %s: %s; the active release stays", model_version, reason)
        return PublishOutcome("full", "refused", reason, seconds=time.perf_counter() - started)

    # --- embeddings releases ---------------------------------------------------------

    def publish_delta_if_due(self, now_s: float, *, force: bool = False, activate: bool = True) -> PublishOutcome:
        self.delta_due_at_s = None
        active = self.store.active()
        if active is None:
            return PublishOutcome("embeddings", "skipped", "no active release: a full release comes first")
        paths = online_checkpoints(self.settings.online_dir)
        if not paths:
            return PublishOutcome("embeddings", "skipped", f"no online checkpoint under {self.settings.online_dir}")
        checkpoints = {}
        for name, path in paths.items():
            try:
                checkpoints[name] = read_online_checkpoint(path)
            except ContractError as error:
                return PublishOutcome("embeddings", "refused", str(error))
        due = embeddings_release_due(active.manifest, checkpoints, now_s=now_s, config=self.config)
        if due.elsewhere:
            # Rows trained on another full model live in another embedding space.
            log.warning("not publishing from %s: the active release %s serves %s", list(due.elsewhere), active.version, active.model_version)
        if not due.taken:
            return PublishOutcome("embeddings", "skipped", due.reason)
        if not (due.scheduled or force):
            if due.rows and self.config.clock == "wall":
                self.delta_due_at_s = active.manifest.created_at + self.config.publish_interval_seconds
            return PublishOutcome("embeddings", "skipped", due.reason)
        return self.publish_delta(active, due, now_s=now_s, activate=activate)

    def publish_delta(self, active: Release, due: EmbeddingsReleaseDue, *, now_s: float | None = None, activate: bool = True) -> PublishOutcome:
        """An embeddings release on top of ``active`` of the rows ``due``
        takes from the online checkpoints (one per user partition when scaled
        out), with the new items, the pre-ranker's rows and the statistics."""
        started = time.perf_counter()
        taken = taken_rows(active, due)
        if not taken.user_ids:
            return PublishOutcome("embeddings", "skipped", f"no user rows changed since the active release ({due.summary()})")
        try:
            check_finite({"user_embeddings": taken.vectors})
            check_shape("user_embeddings", taken.vectors, len(taken.user_ids), active.manifest.dims.id_dim)
            check_unique("user_ids", taken.user_ids)  # partitions own disjoint users
            extras = self._delta_extras(active, due)
        except ReleaseRefused as error:
            log.warning("refused embeddings release from %s: %s; the active release stays", sorted(due.taken), error)
            return PublishOutcome("embeddings", "refused", str(error), seconds=time.perf_counter() - started)
        version = self.store.next_version("embeddings")
        staging = self.store.staging_dir(version)
        rows = self._write_delta(staging, taken, extras)
        manifest = self._delta_manifest(version, active, due, taken, extras, rows, now_s)
        return self._seal_and_activate(staging, manifest, active, activate, len(taken.user_ids), started)

    def _delta_extras(self, active: Release, due: EmbeddingsReleaseDue) -> DeltaExtras:
        """What an embeddings release carries beside the retrieval rows,
        checked (raises ReleaseRefused)."""
        new_items = self._new_item_vectors(active, due) if self.config.new_item_vectors else None
        chain = self._chain(active)
        note = None  # the chain's full release's pre-ranker note, read once
        if chain and PRERANK_NOTE in chain[0].manifest.files:
            note = json.loads(chain[0].file(PRERANK_NOTE).read_text())
        preranker = None if note is None else note["model_version"]
        prerank = None
        if self.settings.prerank.online_user_rows:
            prerank = prerank_rows(preranker, [t.checkpoint for _, t in sorted(due.taken.items())])
        if prerank is not None:
            check_finite({"prerank_user_rows": prerank.rows})
            check_shape("prerank_user_rows", prerank.rows, len(prerank.user_ids), prerank.summary.id_dim)
            check_unique("prerank_user_ids", prerank.user_ids)
        statistics = None
        if preranker is not None and self.settings.prerank.embeddings_statistics:
            try:
                statistics = self.statistics.snapshot(newer_than_ms=_served_statistics_as_of(chain, note))
            except (BatchFormatError, OSError, ValueError) as error:  # the rows still go out; serving keeps the statistics it has
                log.warning("embeddings release without statistics: %s", error)
        return DeltaExtras(new_items, prerank, statistics)

    def _write_delta(self, staging: Path, taken: TakenRows, extras: DeltaExtras) -> dict[str, int]:
        self._write(staging, "user_embeddings.npy", lambda h: np.save(h, taken.vectors))
        self._write(staging, "user_ids.json", lambda h: h.write(json.dumps(taken.user_ids).encode()))
        self._write(staging, "row_event_time_ms.npy", lambda h: np.save(h, taken.event_times))
        rows = {"user_embeddings": len(taken.user_ids)}
        new_items, prerank, statistics = extras.new_items, extras.prerank, extras.statistics
        if new_items is not None:
            self._write(staging, NEW_ITEM_IDS, lambda h: h.write(json.dumps(new_items.item_ids).encode()))
            self._write(staging, NEW_ITEM_VECTORS, lambda h: np.save(h, new_items.vectors))
            rows["new_items"] = len(new_items.item_ids)
        if prerank is not None:
            self._write(staging, PRERANK_USER_IDS, lambda h: h.write(json.dumps(prerank.user_ids).encode()))
            self._write(staging, PRERANK_USER_ROWS, lambda h: np.save(h, prerank.rows))
            self._write(staging, PRERANK_ROW_EVENT_TIME, lambda h: np.save(h, prerank.event_time_ms))
            rows["prerank_user_rows"] = len(prerank.user_ids)
        if statistics is not None:
            data = statistics_bytes(statistics)
            self._write(staging, STATISTICS_FILE, lambda h: h.write(data))
            rows["statistics_keys"] = statistics.keys
        return rows

    def _delta_manifest(self, version: str, active: Release, due: EmbeddingsReleaseDue, taken: TakenRows, extras: DeltaExtras,
                        rows: dict[str, int], now_s: float | None) -> EmbeddingsReleaseManifest:
        learnt = taken.event_times[taken.event_times > 0]
        new_items = extras.new_items
        return EmbeddingsReleaseManifest(
            version=version,
            parent=active.version,
            full_version=active.manifest.full_version,
            model_version=active.model_version,
            created_at=time.time() if now_s is None else now_s,
            online_steps=taken.steps,
            checkpoints=taken.read,
            resync=taken.resync,
            checkpoint_event_time_ms=max(t.checkpoint.newest_event_time_ms for t in due.taken.values()),
            event_time=EventTimeRange(start_ms=int(learnt.min()) if len(learnt) else None, end_ms=int(learnt.max()) if len(learnt) else None),
            newest_click_event_time_ms=max(active.manifest.newest_click_event_time_ms, int(learnt.max()) if len(learnt) else 0),
            newest_click_is_bound=active.manifest.newest_click_is_bound and not len(learnt),
            rows=rows,
            dims=Dims(id_dim=active.manifest.dims.id_dim, output_dim=active.manifest.dims.output_dim),
            config=self.settings.as_record(),
            files={},  # listed by the store when it seals
            new_items=None if new_items is None else NewItems(
                count=len(new_items.item_ids), seen_since_ms=self._full_data_end_ms(active), seconds=new_items.seconds
            ),
            prerank=None if extras.prerank is None else extras.prerank.summary,
            statistics_as_of_ms=None if extras.statistics is None else extras.statistics.as_of_ms,
        )

    def _new_item_vectors(self, active: Release, due: EmbeddingsReleaseDue) -> NewItemVectors:
        """Every item the online trainers' catalogues hold that the chain's
        full release does not (all of them, not only those since ``active``:
        a release is complete on its own), embedded by the frozen item tower
        of the release's full model. Raises ReleaseRefused when they cannot
        be computed or do not fit."""
        known = self._full_release_items(active)
        items = new_catalogue_items(known, [t.checkpoint.catalogue for _, t in sorted(due.taken.items())])
        try:
            embedded = self.item_tower.embed(active.model_version, items, self.config.new_item_id_row)
        except (ArtifactError, ContractError, OSError, KeyError, ValueError) as error:
            raise ReleaseRefused(f"cannot embed {len(items)} new items with full model {active.model_version}: {error}") from error
        check_shape("new_item_vectors", embedded.vectors, len(items), active.manifest.dims.output_dim)
        if self.config.new_item_clicks:  # toward the users who clicked them (trainer.new_item_clicks)
            states = [t.checkpoint.new_item_clicks for _, t in sorted(due.taken.items())]
            clicks = clicks_of(embedded.item_ids, states, embedded.vectors.shape[1])
            vectors = blend_with_clicks(embedded.vectors, clicks, self.config.new_item_click_prior)
            embedded = replace(embedded, vectors=vectors)
        check_finite({"new_item_vectors": embedded.vectors})
        check_unique("new_item_ids", embedded.item_ids)
        return embedded

    def _full_release_items(self, active: Release) -> frozenset[str]:
        full_version = active.manifest.full_version
        if self._full_items is None or self._full_items[0] != full_version:
            full = self.store.get(full_version)
            self._full_items = (full_version, frozenset(json.loads(full.file("item_ids.json").read_text())))
        return self._full_items[1]

    def _full_data_end_ms(self, active: Release) -> int:
        end = self.store.get(active.manifest.full_version).manifest.event_time.end_ms
        return int(end) if end is not None else 0

    # --- shared steps ----------------------------------------------------------------

    def _write(self, staging, name: str, write: Callable[[BinaryIO], object] | Callable[[Path], object], *, by_path: bool = False) -> None:
        """One file of a staged release, through a handle (``by_path``: a
        library that wants a path, e.g. Faiss). A refused write (a full disk,
        a read-only store) raises ``StorageError`` naming the file, and the
        staging directory is removed so its space comes back for the next try."""
        try:
            if by_path:
                with writing(staging / name):
                    write(staging / name)
            else:
                write_file(staging / name, write)
        except StorageError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.on_stage("file", name)

    def _seal_and_activate(self, staging, manifest: ReleaseManifest, active, activate, rows, started) -> PublishOutcome:
        version, kind = manifest.version, manifest.kind
        try:
            release = self.store.seal(staging, manifest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # never sealed: nothing of it is visible
            raise
        self.on_stage("sealed", version)
        if activate:
            try:
                # Deltas are built on the active release: refuse if it moved meanwhile.
                expected = active.version if (kind == "embeddings" and active is not None) else ...
                self.store.activate(version, by="publisher", expected_active=expected)
            except ActiveChanged as error:
                self.store.discard(version)
                return PublishOutcome(kind, "skipped", f"{error}; will rebuild on the new active release next tick")
            self.on_stage("activated", version)
            self._retention_due = True  # after the announcement (``tick``): it reads every manifest of every chain
        seconds = time.perf_counter() - started
        log.info("published %s release %s (%d user rows) in %.2f s", kind, version, rows, seconds)
        return PublishOutcome(kind, "published", "active" if activate else "sealed, not activated", release.version, rows, seconds)

    def _chain(self, release: Release | None) -> list[Release]:
        """``release``'s chain, its full release first ([]: none, or broken)."""
        if release is None:
            return []
        try:
            return self.store.chain(release.version)
        except ReleaseError as error:
            log.warning("active release %s has a broken chain: %s", release.version, error)
            return []

    def _chain_root(self, release: Release | None) -> Release | None:
        chain = self._chain(release)
        return chain[0] if chain else None

    # --- the user-embeddings topic ---------------------------------------------------

    def send_pending_to_topic(self) -> int:
        """Send the active chain's releases that have not gone to the topic yet."""
        if self.topic is None:
            return 0
        active = self.store.active()
        if active is None:
            return 0
        note = self.store.read_note(KAFKA_NOTE) or {}
        sent_through = int(note.get("sent_through_sequence", 0))
        sent = 0
        try:
            chain = self.store.chain(active.version)
        except ReleaseError as error:
            log.warning("not sending to topic %s: %s", self.topic.topic, error)
            return 0
        for release in chain:
            if release.sequence <= sent_through:
                continue
            user_ids = json.loads(release.file("user_ids.json").read_text())
            vectors = np.load(release.file("user_embeddings.npy"))
            event_times = np.load(release.file("row_event_time_ms.npy")) if release.kind == "embeddings" else None
            keep = [i for i, u in enumerate(user_ids) if u]
            try:
                self.topic.send_rows(
                    [user_ids[i] for i in keep],
                    vectors[keep],
                    None if event_times is None else event_times[keep],
                    release=release.version,
                    model_version=release.model_version,
                    kind=release.kind,
                )
            except Exception as error:  # a broker outage must not stop releases
                log.warning("could not send release %s to topic %s (retrying next tick): %s", release.version, self.topic.topic, error)
                break
            self.store.write_note(KAFKA_NOTE, {"sent_through_sequence": release.sequence, "sent_through": release.version})
            sent += len(keep)
        return sent


def _holdout_recall(manifest: ReleaseManifest) -> float | None:
    return manifest.checks.holdout_recall_at_50 if isinstance(manifest, FullReleaseManifest) else None
