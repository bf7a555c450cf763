"""The online trainer: follows the stream of batches in event-time order,
one pass, and updates only the user ID embedding rows present in each
batch (see ``Learner`` with ``trainable="user_ids"``).

- It forks from the newest full model and trains every batch whose window
  starts at or after that model's ``data_end_ms`` (the end of the day the
  full model learnt, all of it). The fork carries the full model's
  row-wise Adagrad sums of the user ID table, so the first online steps
  are as long as the full trainer's last ones rather than first steps
  from zero.
- Clicks of users the frequency filter has not admitted yet are held
  (``PendingClicks``, at most ``vocabulary.pending_clicks``) and learnt
  in the minibatch that admits the user.
- When a newer full model appears (one the publisher has not refused) it re-bases: it forks again from that
  model and catches up on the batches since its data ended.
- It records, per user row, the step that last changed it and the newest
  event time it learnt from, so a publisher can take "the rows changed
  since step S" and their freshness from any checkpoint.
- Checkpoints are atomic (write, fsync, rename) and hold the table, the
  optimiser rows, the vocabulary, the catalogue, the frequency estimator
  and the position in the batch stream: a restart resumes after the last
  checkpointed batch, so no batch's effect is applied twice and none is
  skipped.
- The position is a frontier (``next_window_ms``: every batch of an
  earlier window is done) plus the names of the batches trained within
  ``online_lookback_seconds`` behind the newest one. Several streams
  workers each write their own file for a window, not always at the same
  moment; a file that lands late within the lookback is still trained,
  once.
- Scale-out: with ``partition=(k, n)`` a trainer learns only the users whose
  ID fingerprint is k modulo n, and keeps its own checkpoint; n trainers
  together cover every user once.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from freshtower.trainer.artifacts import (
    ArtifactError,
    LoadedModel,
    estimator_from_tensors,
    estimator_tensors,
    full_models_dir,
    load_full_model,
    servable_full_model,
)
from freshtower.trainer.catalogue import ItemCatalogue
from freshtower.trainer.learner import Learner
from freshtower.trainer.pending_clicks import PendingClicks
from freshtower.trainer.prerank_full import latest_preranker
from freshtower.trainer.prerank_online import OnlinePreranker
from freshtower.trainer.samplers import clicked_only
from freshtower.trainer.soft_labels import distillation_records, positive_spans
from freshtower.trainer.sparse_optim import RowWiseAdagrad
from freshtower.trainer.vocabulary import IdVocabulary

from freshtower.core.fingerprints import fingerprint_strings
from freshtower.core.batches import BatchRef, FeatureSpec, SampleColumns, list_batches, read_batch
from freshtower.core.contracts.online_checkpoint import (
    CheckpointStats,
    OnlineCheckpoint,
    read_online_checkpoint,
    write_online_checkpoint,
)
from freshtower.core.settings import Settings

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


class MissingModelError(FileNotFoundError):
    """The online trainer needs a full model to fork from."""


@dataclass
class BatchReport:
    window_start_ms: int
    samples: int
    seconds: float
    mean_loss: float | None


@dataclass
class OnlineStats:
    batches: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    rebases: int = 0
    checkpoints: int = 0
    recent: list[BatchReport] = field(default_factory=list)


@dataclass(frozen=True)
class Partition:
    """This trainer's share of the users: fingerprint % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index} of {self.count} does not exist")

    @classmethod
    def parse(cls, text: str) -> "Partition":
        """``"k/n"`` (k counted from 0)."""
        index, _, count = text.partition("/")
        return cls(int(index), int(count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def checkpoint_path(settings: Settings, partition: Partition = Partition()) -> Path:
    if partition.count == 1:
        return settings.online_dir / CHECKPOINT_NAME
    return settings.online_dir / f"checkpoint-{partition.index}-of-{partition.count}.pt"


def batch_key(ref: BatchRef) -> str:
    """A batch's name in the stream position: day directory / file stem."""
    return f"{ref.manifest_path.parent.name}/{ref.manifest_path.stem}"


class OnlineTrainer:
    """User-ID-only online learning over batch files."""

    def __init__(self, settings: Settings, base: LoadedModel, partition: Partition = Partition()):
        self.settings = settings
        self.partition = partition
        self.spec = FeatureSpec.from_model(settings.model)
        self.stats = OnlineStats()
        self._fork(base)
        self._last_checkpoint = time.monotonic()
        self._unsaved_batches = 0  # trained since the last checkpoint
        self._unsaved_keys: list[str] = []  # their names (``batch_key``)
        self.checkpointed_batches: list[str] = []  # the batches the last checkpoint added (its announcement names them)
        self.on_checkpoint: Callable[[Path, OnlineCheckpoint], None] | None = None  # e.g. announce it to the publisher

    # --- forking and re-basing --------------------------------------------------

    def _fork(self, base: LoadedModel) -> None:
        if base.settings.model != self.settings.model:
            raise ArtifactError(f"full model {base.ref.version} was trained with another model shape than configured")
        self.base = base.ref
        self.model = base.model
        self.model.eval()
        pending = getattr(getattr(self, "learner", None), "pending", None)
        if pending is None:
            pending = PendingClicks(self.settings.vocabulary.pending_clicks, self.spec)
        else:  # a re-base: the new model learnt the clicks of the users it admitted
            pending.rebase(lambda fingerprints: self.model.user_ids.lookup([], fingerprints), base.ref.data_end_ms)
        self.learner = Learner(
            self.model, self.settings.training, base.estimator, trainable="user_ids", seed=self.settings.training.seed, pending=pending,
            distillation=self.settings.distillation,
        )
        _carry_user_id_accumulators(self.learner, base)
        self.next_window_ms = base.ref.data_end_ms  # frontier: earlier windows are done
        self.trained_recent: set[str] = set()  # batches trained at or after the frontier
        self._newest_window_ms = base.ref.data_end_ms
        rows = self.model.user_tower.id_embedding.shape[0]
        # The full model's rows count as published with it (step 0).
        self.step = 0
        self.row_updated_step = np.zeros(rows, dtype=np.int64)
        self.row_event_time_ms = np.zeros(rows, dtype=np.int64)
        self.newest_event_time_ms = int(base.ref.data_end_ms)
        self.prerank = OnlinePreranker.latest(self.settings)  # the pre-ranker's user rows (None: none, or the setting is off)

    def _prerank_owner(self, user_ids: list[str]) -> np.ndarray:
        owner = fingerprint_strings(user_ids) % np.uint64(self.partition.count)
        return owner == np.uint64(self.partition.index)

    def _rebase_prerank_if_newer(self) -> bool:
        """Fork the pre-ranker's rows again from a newer daily pre-ranker; True if so."""
        if not self.settings.prerank.online_user_rows:
            return False
        latest = latest_preranker(self.settings)
        if latest is None or (self.prerank is not None and latest.version == self.prerank.base.version):
            return False
        done = [r for r in list_batches(self.settings.batches_dir) if self._done(r)]
        log.info("re-basing the online pre-ranker rows onto %s", latest.version)
        self.prerank = OnlinePreranker.latest(self.settings, done)
        return self.prerank is not None

    def _done(self, ref: BatchRef) -> bool:
        return ref.window_start_ms < self.next_window_ms or batch_key(ref) in self.trained_recent

    def rebase_if_newer(self) -> bool:
        """Fork from the newest full model if it is not our base; True if so."""
        latest = servable_full_model(full_models_dir(self.settings))
        if latest is None or latest.version == self.base.version:
            if self._rebase_prerank_if_newer():
                self.checkpoint()
            return False
        log.info("re-basing online trainer from %s onto %s", self.base.version, latest.version)
        self._fork(load_full_model(latest))
        self.stats.rebases += 1
        self.checkpoint()
        return True

    # --- training ----------------------------------------------------------------

    def pending(self) -> list[BatchRef]:
        """Complete batches not trained yet, in window order."""
        return [
            r
            for r in list_batches(self.settings.batches_dir)
            if r.window_start_ms >= self.next_window_ms and batch_key(r) not in self.trained_recent
        ]

    def _mine(self, samples: SampleColumns) -> SampleColumns:
        if self.partition.count == 1:
            return samples
        owner = samples.user_id_fingerprints() % np.uint64(self.partition.count)
        return samples.take(np.flatnonzero(owner == np.uint64(self.partition.index)))

    def learn_batch(self, ref: BatchRef, samples: SampleColumns | None = None) -> BatchReport:
        """Train one batch file in event-time order, one pass."""
        key = batch_key(ref)
        if ref.window_start_ms < self.next_window_ms or key in self.trained_recent:
            raise ValueError(f"batch {ref.path} is behind the stream position or trained already; refusing to train it twice")
        if samples is None:
            samples = read_batch(ref, self.spec)
        batch_size = self.settings.training.batch_size
        if self.learner.distillation is None:
            samples = clicked_only(self._mine(samples))  # minibatches of batch_size positives, not of records
            spans = [(start, start + batch_size) for start in range(0, len(samples), batch_size)]
        else:  # the clicks' minibatches, each with the shown records (teacher scores) between its clicks
            records = distillation_records(ref, self.spec, self.settings.distillation, self.settings.prerank.category_feature)
            samples = self._mine(records)  # (re-read: the prefetched samples hold the clicks only)
            spans = positive_spans(samples.labels, batch_size)
        started = time.perf_counter()
        losses: list[float] = []
        trained = 0
        for n, (start, stop) in enumerate(spans):
            minibatch = samples.span(start, stop)
            result = self.learner.learn(minibatch, where=f"{ref.path} minibatch {n}")
            if result.samples == 0 and result.max_event_time_ms is None:
                continue
            self.step += 1
            self._track_rows(result.updated_user_rows, result.max_event_time_ms)
            losses.append(result.loss)
            trained += result.samples
        if self.prerank is not None:
            self.prerank.learn_batch(ref, None if self.partition.count == 1 else self._prerank_owner)
        seconds = time.perf_counter() - started
        self._advance(key, ref.window_start_ms)
        self._unsaved_keys.append(key)
        if ref.manifest.max_event_time_ms is not None:
            self.newest_event_time_ms = max(self.newest_event_time_ms, ref.manifest.max_event_time_ms)
        report = BatchReport(ref.window_start_ms, trained, seconds, float(np.mean(losses)) if losses else None)
        self.stats.batches += 1
        self.stats.samples += trained
        self._unsaved_batches += 1
        self.stats.train_seconds += seconds
        self.stats.recent = (self.stats.recent + [report])[-100:]
        return report

    def _advance(self, key: str, window_start_ms: int) -> None:
        self.trained_recent.add(key)
        self._newest_window_ms = max(self._newest_window_ms, window_start_ms)
        frontier = self._newest_window_ms - int(self.settings.training.online_lookback_seconds * 1000)
        if frontier > self.next_window_ms:
            self.next_window_ms = frontier
            self.trained_recent = {k for k in self.trained_recent if self._window_of(k) >= frontier}

    @staticmethod
    def _window_of(key: str) -> int:
        day, stem = key.split("/")
        stem = stem.split("-", 1)[0]  # a window's part (streams worker: -p<partition>)
        return int(datetime.strptime(f"{day} {stem}", "%Y-%m-%d %H%M%S").replace(tzinfo=timezone.utc).timestamp() * 1000)

    def _track_rows(self, rows: np.ndarray, event_time_ms: int | None) -> None:
        needed = self.model.user_tower.id_embedding.shape[0]
        if len(self.row_updated_step) < needed:
            self.row_updated_step = np.concatenate([self.row_updated_step, np.zeros(needed - len(self.row_updated_step), np.int64)])
            self.row_event_time_ms = np.concatenate([self.row_event_time_ms, np.zeros(needed - len(self.row_event_time_ms), np.int64)])
        if len(rows):
            self.row_updated_step[rows] = self.step
            if event_time_ms is not None:
                np.maximum.at(self.row_event_time_ms, rows, event_time_ms)

    def run(
        self,
        *,
        follow: bool = False,
        poll_seconds: float = 1.0,
        max_batches: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_batch: Callable[[BatchReport], None] | None = None,
        prefetch: bool = True,
        wait: Callable[[float], object] = time.sleep,
    ) -> OnlineStats:
        """Train pending batches; with ``follow``, keep polling for new ones
        (and new full models) until ``should_stop()``. ``wait(poll_seconds)``
        is the pause when caught up: a ``Wakeup`` on the batch announcements
        returns as soon as one arrives."""
        reader = BatchPrefetcher(self.spec, enabled=prefetch)
        trained = 0
        threads_before = torch.get_num_threads()
        torch.set_num_threads(self._torch_threads(prefetch))
        try:
            while not should_stop():
                self.rebase_if_newer()
                pending = self.pending()
                if max_batches is not None:
                    pending = pending[: max_batches - trained]
                every_batch = self.settings.training.checkpoint_every_seconds > 0
                for n, (ref, samples) in enumerate(reader.read(pending)):
                    report = self.learn_batch(ref, samples)
                    trained += 1
                    if on_batch:
                        on_batch(report)
                    # At period 0, one checkpoint per window: its partitions' batches
                    # land together, and each checkpoint is a release.
                    if every_batch or n == len(pending) - 1 or pending[n + 1].window_start_ms != ref.window_start_ms:
                        self._maybe_checkpoint()
                    if should_stop() or (max_batches is not None and trained >= max_batches):
                        break
                if not follow or (max_batches is not None and trained >= max_batches):
                    break
                if not pending:
                    # Caught up: the last batches of a quiet stream must not
                    # wait for the next batch to reach the checkpoint (and the
                    # publisher); the period still bounds how often it is written.
                    if self._unsaved_batches:
                        self._maybe_checkpoint()
                    wait(poll_seconds)
        finally:
            reader.close()
            self.checkpoint()
            torch.set_num_threads(threads_before)
        return self.stats

    def _torch_threads(self, prefetch: bool) -> int:
        """The configured count, else every core but the decoder's: torch's
        thread pool waits for all its threads at each op, so sharing a core
        with the decode process (or the streams worker) makes steps several
        times slower (measured: 1.8k vs 11.7k samples/s, full trainer, two
        threads vs one on a busy 2-core machine)."""
        if self.settings.training.threads:
            return self.settings.training.threads
        cores = os.cpu_count() or 1
        return max(1, cores - 1) if prefetch else cores

    # --- checkpoints --------------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        period = self.settings.training.checkpoint_every_seconds
        if time.monotonic() - self._last_checkpoint >= period:
            self.checkpoint()

    def checkpoint(self) -> Path:
        """Write the trainer's state atomically; returns the path."""
        table = self.model.user_tower.id_embedding
        rows = len(self.model.user_ids)
        optimizer_state = {
            key: value[:rows].clone() if torch.is_tensor(value) and value.dim() >= 1 else value
            for key, value in self.learner.table_optimizer.state.get(table, {}).items()
        }
        checkpoint = OnlineCheckpoint(
            base_version=self.base.version,
            partition=(self.partition.index, self.partition.count),
            next_window_ms=int(self.next_window_ms),
            trained_recent=sorted(self.trained_recent),
            newest_window_ms=int(self._newest_window_ms),
            step=int(self.step),
            newest_event_time_ms=int(self.newest_event_time_ms),
            user_table=table.detach()[:rows].clone(),
            user_ids=self.model.user_ids.state(),
            optimizer=optimizer_state,
            row_updated_step=torch.from_numpy(self.row_updated_step[:rows].copy()),
            row_event_time_ms=torch.from_numpy(self.row_event_time_ms[:rows].copy()),
            estimator=estimator_tensors(self.learner.estimator),
            catalogue=self.model.catalogue.state_dict(),
            pending_clicks=self.learner.pending.state_dict(),
            learner_steps=int(self.learner.steps),
            rng_state=dict(self.learner.rng.bit_generator.state),
            written_at=time.time(),
            # this process's figures so far, for monitoring (`freshtower run`'s summary)
            stats=CheckpointStats(batches=self.stats.batches, samples=self.stats.samples, rebases=self.stats.rebases),
            prerank=None if self.prerank is None else self.prerank.state(),
            new_item_clicks=self.learner.new_item_clicks.state_dict(self.model.catalogue.ids),
        )
        path = checkpoint_path(self.settings, self.partition)
        write_online_checkpoint(path, checkpoint)
        self._last_checkpoint = time.monotonic()
        self._unsaved_batches = 0
        self.checkpointed_batches, self._unsaved_keys = self._unsaved_keys, []
        self.stats.checkpoints += 1
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, checkpoint)
        return path

    def _restore(self, checkpoint: OnlineCheckpoint) -> None:
        if checkpoint.partition != (self.partition.index, self.partition.count):
            raise ArtifactError(f"checkpoint belongs to partition {list(checkpoint.partition)}, not {self.partition}")
        model = self.model
        model.user_ids = IdVocabulary.from_state(checkpoint.user_ids)
        model.catalogue = ItemCatalogue.from_state_dict(checkpoint.catalogue)
        table = model.user_tower.id_embedding
        table.data = checkpoint.user_table.clone()
        optimizer = self.learner.table_optimizer
        optimizer.state[table] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in checkpoint.optimizer.items()}
        self.learner.estimator = estimator_from_tensors(checkpoint.estimator)
        self.learner.refresh_item_cache()
        clicked = checkpoint.new_item_clicks.get("item_ids", [])
        self.learner.new_item_clicks.load_state_dict(checkpoint.new_item_clicks, model.catalogue.indices(clicked))
        self.learner.pending = PendingClicks.from_state_dict(checkpoint.pending_clicks, self.spec, self.settings.vocabulary.pending_clicks)
        self.next_window_ms = checkpoint.next_window_ms
        self.trained_recent = set(checkpoint.trained_recent)
        self._newest_window_ms = checkpoint.newest_window_ms
        self.step = checkpoint.step
        self.newest_event_time_ms = checkpoint.newest_event_time_ms
        self.row_updated_step = checkpoint.row_updated_step.numpy().copy()
        self.row_event_time_ms = checkpoint.row_event_time_ms.numpy().copy()
        self.learner.steps = checkpoint.learner_steps
        self.learner.rng.bit_generator.state = checkpoint.rng_state
        if self.prerank is not None:
            saved = checkpoint.prerank
            done = [r for r in list_batches(self.settings.batches_dir) if self._done(r)]
            self.prerank = OnlinePreranker.latest(self.settings, done)  # its item statistics up to the position
            if saved is not None and self.prerank is not None and saved.base_version == self.prerank.base.version:
                self.prerank.restore(saved)
            elif self.prerank is not None:  # no rows saved for this pre-ranker: learn again what it has not learnt
                log.info("online pre-ranker rows start from %s at the resumed position", self.prerank.base.version)

    @classmethod
    def start(cls, settings: Settings, partition: Partition = Partition()) -> "OnlineTrainer":
        """Resume from the checkpoint if it is based on the newest full model,
        else fork from the newest full model."""
        latest = servable_full_model(full_models_dir(settings))
        if latest is None:
            raise MissingModelError(
                f"no full model under {full_models_dir(settings)}: run `freshtower train full --day YYYY-MM-DD` first"
            )
        path = checkpoint_path(settings, partition)
        checkpoint = read_online_checkpoint(path) if path.is_file() else None
        if checkpoint is not None and checkpoint.base_version != latest.version:
            log.info("checkpoint is based on %s, newest full model is %s: re-basing", checkpoint.base_version, latest.version)
            checkpoint = None
        trainer = cls(settings, load_full_model(latest), partition)
        if checkpoint is not None:
            trainer._restore(checkpoint)
            log.info("resumed online trainer at window %d (step %d)", trainer.next_window_ms, trainer.step)
        return trainer


def _carry_user_id_accumulators(learner: Learner, base: LoadedModel) -> None:
    """Start the online row-wise Adagrad from the full model's sums for the
    user ID table (the first table it saved), not from zero: from zero, one
    minibatch moves a row by a median 37% of its norm, undoing the full
    model. Rows admitted online start from zero, as new rows do in full
    training. SparseAdam keeps its own (fresh) state."""
    if not isinstance(learner.table_optimizer, RowWiseAdagrad):
        return
    tables = (base.optimizer_state or {}).get("tables") or []
    if not tables or tables[0] is None:
        return
    table = learner.model.user_tower.id_embedding
    saved = tables[0]
    sums = torch.zeros(table.shape[0], dtype=table.dtype)
    rows = min(len(saved), table.shape[0])
    sums[:rows] = saved[:rows]
    learner.table_optimizer.state[table]["sum"] = sums


def decode_for_training(ref: BatchRef, spec: FeatureSpec) -> SampleColumns:
    """Decode a batch file and fingerprint its IDs (users, items, hard
    negatives) and user feature values: in the prefetch process, that is
    ~5 ms a minibatch the training step no longer spends."""
    samples = read_batch(ref, spec)
    samples.user_id_fingerprints(), samples.item_id_fingerprints(), samples.hard_negative_id_fingerprints()
    samples.user_categorical_value_fingerprints()
    return samples


class BatchPrefetcher:
    """Decodes the next batch files in a background process while the
    trainer learns the current one (protobuf decoding costs about as much
    CPU as the training step, and the machine has two cores)."""

    def __init__(self, spec: FeatureSpec, enabled: bool = True, depth: int = 2):
        self.spec = spec
        self.depth = depth
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) if enabled else None

    def read(self, refs: Iterable[BatchRef]):
        refs = list(refs)
        if self._pool is None:
            for ref in refs:
                yield ref, read_batch(ref, self.spec)
            return
        queue: list[tuple[BatchRef, Future]] = []
        for ref in refs:
            queue.append((ref, self._pool.submit(decode_for_training, ref, self.spec)))
            if len(queue) > self.depth:
                done_ref, future = queue.pop(0)
                yield done_ref, future.result()
        for done_ref, future in queue:
            yield done_ref, future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
