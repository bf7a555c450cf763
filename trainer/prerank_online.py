"""The pre-ranker online: its user ID rows learnt from the stream's ranking
samples, batch by batch, like the retrieval model's (``trainer/online.py``
drives it beside its own learner, so both follow one stream position and
one checkpoint).

- It forks from the newest daily pre-ranker (``latest_preranker``) and
  learns every batch whose window starts at or after that model's
  ``data_end_ms``; a newer daily pre-ranker re-bases it.
- Only the user ID table moves (row-wise Adagrad,
  ``prerank.online_learning_rate``, fresh state at each fork as the daily
  training's); the towers, the item and feature tables and the upper
  layers stay the daily model's. Users the frequency filter admits get a
  row (the default row's values, then learnt).
- The loss is the daily training's (``prerank_objective``: clicks and the
  ranker's scores), over a batch's requests in event-time order,
  ``prerank.batch_requests`` per minibatch. The cross tower's item
  statistics are every statistics row seen so far (the day before the
  fork onwards) as of each request's minute, as the daily training computes them.
- Each changed row keeps the step that last changed it and the newest
  event time it learnt from: an embeddings release carries the rows with
  ``row_updated_step > 0`` (``PrerankUserRows`` in the online checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from freshtower.trainer.learner import MS_PER_DAY
from freshtower.trainer.prerank_full import (
    LoadedPreranker,
    item_statistics_for,
    latest_preranker,
    load_preranker,
    model_inputs,
)
from freshtower.trainer.distillation import prerank_objective
from freshtower.trainer.losses import NonFiniteLossError
from freshtower.trainer.sparse_optim import RowWiseAdagrad, grow_table, reset_rows
from freshtower.trainer.vocabulary import IdVocabulary

from freshtower.core.batches import BatchRef, FeatureSpec, list_batches
from freshtower.core.batches.ranking import RankingColumns, read_ranking_samples, read_statistics_rows, statistics_counts
from freshtower.core.contracts.online_checkpoint import PrerankUserRows
from freshtower.core.settings import Settings
from freshtower.core.statistics import encode_statistics, item_count_deltas

log = logging.getLogger(__name__)

Owner = Callable[[list[str]], np.ndarray]  # user IDs -> bool mask of this trainer's partition


class OnlinePreranker:
    """User-ID-row-only online learning of one daily pre-ranker."""

    def __init__(self, settings: Settings, loaded: LoadedPreranker, done: list[BatchRef] = ()):
        self.settings = settings
        self.base = loaded.ref
        self.model = loaded.model
        self.model.eval()  # no dropout or batch statistics: eval and train compute the same
        self.spec = FeatureSpec.from_model(settings.model)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.table = self.model.user_tower.id_embedding
        self.table.requires_grad_(True)
        self.optimizer = RowWiseAdagrad([self.table], lr=settings.prerank.online_learning_rate)
        self.start_ms = int(self.base.manifest.data_end_ms)
        self.step = 0
        rows = self.table.shape[0]
        self.row_updated_step = np.zeros(rows, dtype=np.int64)
        self.row_event_time_ms = np.zeros(rows, dtype=np.int64)
        # the item statistics: the fork's day and the day before, then each batch's rows
        day_refs = [r for r in list_batches(settings.batches_dir) if self.start_ms - MS_PER_DAY <= r.window_start_ms < self.start_ms]
        self.items = item_statistics_for(settings.batches_dir, day_refs)
        for ref in done:  # a restart: the batches learnt since the fork
            self._apply_statistics(ref)

    @classmethod
    def latest(cls, settings: Settings, done: list[BatchRef] = ()) -> "OnlinePreranker | None":
        """Forked from the newest daily pre-ranker; None when there is none or the setting is off."""
        if not settings.prerank.online_user_rows:
            return None
        ref = latest_preranker(settings)
        if ref is None:
            return None
        loaded = load_preranker(ref)
        if loaded.settings.model != settings.model:
            log.warning("pre-ranker %s was trained with another model shape than configured: its user rows are not learnt online",
                        ref.version)
            return None
        return cls(settings, loaded, [r for r in done if r.window_start_ms >= int(ref.manifest.data_end_ms)])

    def _apply_statistics(self, ref: BatchRef) -> None:
        rows = read_statistics_rows(ref)
        if rows is not None:
            self.items.apply(item_count_deltas(rows))

    def learn_batch(self, ref: BatchRef, owner: Owner | None = None) -> int:
        """Learn one batch's ranking samples (this partition's users); the requests learnt."""
        if ref.window_start_ms < self.start_ms:
            return 0
        self._apply_statistics(ref)
        columns = read_ranking_samples(ref, self.spec)
        if owner is not None and len(columns):
            columns = columns.take(np.flatnonzero(owner(columns.user_ids)))
        if not len(columns):
            return 0
        columns = columns.take(np.argsort(columns.event_time_ms, kind="stable"))
        self._admit(columns, ref.window_start_ms // MS_PER_DAY)
        p = self.settings.prerank
        features = encode_statistics(statistics_counts(columns, self.items), p.ctr_prior, p.ctr_prior_strength)
        offsets = columns.offsets
        size = p.batch_requests
        for start in range(0, len(columns), size):
            chosen = np.arange(start, min(start + size, len(columns)))
            self._learn(columns.take(chosen), features[offsets[chosen[0]] : offsets[chosen[-1] + 1]], f"{ref.path} requests {start}+")
        return len(columns)

    def _admit(self, columns: RankingColumns, day: int) -> None:
        new = self.model.user_ids.observe(columns.user_ids, day)
        grow_table(self.table, len(self.model.user_ids), (self.optimizer,))
        if len(new):
            reset_rows(self.table, torch.from_numpy(new), (self.optimizer,))
        self._grow_tracking()

    def _grow_tracking(self) -> None:
        needed = self.table.shape[0]
        if len(self.row_updated_step) < needed:
            extra = np.zeros(needed - len(self.row_updated_step), np.int64)
            self.row_updated_step = np.concatenate([self.row_updated_step, extra])
            self.row_event_time_ms = np.concatenate([self.row_event_time_ms, extra])

    def _learn(self, part: RankingColumns, features: np.ndarray, where: str) -> None:
        users, items, request_of = model_inputs(self.model, part)
        logits = self.model(users, items, torch.from_numpy(features), request_of, sparse=True)
        loss = prerank_objective(
            logits, torch.from_numpy(part.clicked), torch.from_numpy(part.scores), torch.from_numpy(part.offsets),
            self.settings.distillation,
        )
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"online pre-ranker, {where}: loss {float(loss)}")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        rows = users.id_rows.numpy()
        known = rows > 0  # the default row is shared by every unadmitted user: it stays the daily model's
        if not known.any():
            return
        self.step += 1
        rows, times = rows[known], part.event_time_ms[known]
        self.row_updated_step[rows] = self.step
        np.maximum.at(self.row_event_time_ms, rows, times)

    # --- the checkpoint's share -----------------------------------------------------

    def state(self) -> PrerankUserRows:
        rows = len(self.model.user_ids)
        optimizer = {
            key: value[:rows].clone() if torch.is_tensor(value) and value.dim() >= 1 else value
            for key, value in self.optimizer.state.get(self.table, {}).items()
        }
        return PrerankUserRows(
            base_version=self.base.version,
            step=int(self.step),
            user_table=self.table.detach()[:rows].clone(),
            user_ids=self.model.user_ids.state(),
            optimizer=optimizer,
            row_updated_step=torch.from_numpy(self.row_updated_step[:rows].copy()),
            row_event_time_ms=torch.from_numpy(self.row_event_time_ms[:rows].copy()),
        )

    def restore(self, saved: PrerankUserRows) -> None:
        if saved.base_version != self.base.version:
            raise ValueError(f"pre-ranker rows of {saved.base_version} do not restore onto {self.base.version}")
        self.model.user_ids = IdVocabulary.from_state(saved.user_ids)
        self.table.data = saved.user_table.clone()
        self.optimizer.state[self.table] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in saved.optimizer.items()}
        self.step = saved.step
        self.row_updated_step = saved.row_updated_step.numpy().copy()
        self.row_event_time_ms = saved.row_event_time_ms.numpy().copy()
