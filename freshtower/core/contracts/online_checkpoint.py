"""The online trainer's checkpoint: ``<data_dir>/online/checkpoint.pt``
(``checkpoint-<k>-of-<n>.pt`` per user partition when scaled out).

One torch file (loads with ``weights_only``), replaced atomically, so a
reader always sees one consistent state. Written by the online trainer
(``write_online_checkpoint``), read back by it on restart and by the
publisher (the rows changed since a step) and ``freshtower run`` (progress)
through ``read_online_checkpoint``. ``format`` is the schema version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from freshtower.core.contracts.validation import CONTRACT_CONFIG, ContractError, as_dict, check_schema_version, decode
from freshtower.core.contracts.vocabulary import VocabularyState
from freshtower.core.storage import atomic_write

CHECKPOINT_SCHEMA = 2
CONTRACT = "online checkpoint"


@dataclass(frozen=True, kw_only=True)
class CheckpointStats:
    """The writing process's figures so far, for monitoring."""

    __pydantic_config__ = CONTRACT_CONFIG

    batches: int
    samples: int  # positives learnt
    rebases: int  # forks onto a newer full model


@dataclass(frozen=True, kw_only=True)
class PrerankUserRows:
    """The pre-ranker's user ID rows the online trainer learnt from ranking
    samples since it forked from the daily pre-ranker ``base_version``."""

    __pydantic_config__ = CONTRACT_CONFIG

    base_version: str  # the daily pre-ranker (models/prerank/<day>.<n>) the rows were forked from
    step: int  # minibatch steps since that fork
    user_table: torch.Tensor  # (R, id_dim) float32 the pre-ranker's user ID embeddings
    user_ids: VocabularyState  # row -> user ID
    optimizer: dict[str, Any]  # the row-wise Adagrad state, first R rows
    row_updated_step: torch.Tensor  # (R,) int64: step that last changed each row (0: as forked)
    row_event_time_ms: torch.Tensor  # (R,) int64: newest event time each row learnt from, ms


@dataclass(frozen=True, kw_only=True)
class OnlineCheckpoint:
    __pydantic_config__ = CONTRACT_CONFIG

    format: int = CHECKPOINT_SCHEMA
    base_version: str  # the full model the trainer forked from
    partition: tuple[int, int]  # (index, count): the users whose fingerprint % count == index
    # position in the batch stream: every window before next_window_ms is
    # done, and so are the batches named in trained_recent (day/stem)
    next_window_ms: int
    trained_recent: list[str]
    newest_window_ms: int
    step: int  # minibatch steps since the fork; rows changed after step S have row_updated_step > S
    newest_event_time_ms: int  # newest event time learnt from (the full model's data end at step 0)
    user_table: torch.Tensor  # (R, id_dim) float32 user ID embeddings
    user_ids: VocabularyState  # row -> user ID
    optimizer: dict[str, Any]  # the table optimiser's state, first R rows
    row_updated_step: torch.Tensor  # (R,) int64: step that last changed each row (0: as forked)
    row_event_time_ms: torch.Tensor  # (R,) int64: newest event time each row learnt from, ms
    estimator: dict[str, torch.Tensor]  # item-frequency estimator state
    catalogue: dict[str, Any]  # item catalogue state
    pending_clicks: dict[str, Any]  # clicks of users not admitted yet, learnt when admitted (trainer.pending_clicks)
    learner_steps: int
    rng_state: dict[str, Any]  # numpy bit generator state of the learner
    written_at: float  # wall time, seconds
    stats: CheckpointStats
    prerank: PrerankUserRows | None = None  # None: no pre-ranker to follow, or prerank.online_user_rows is off
    # items first seen since the base model, with clicks: {"item_ids": [...], "sums": (n, D) float32 sum of the clickers'
    # user vectors, "counts": (n,) int64} (trainer.new_item_clicks); empty in checkpoints written before it existed
    new_item_clicks: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.user_ids.row_ids)


def write_online_checkpoint(path: Path, checkpoint: OnlineCheckpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (write, fsync, rename)."""
    payload = as_dict(checkpoint)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: torch.save(payload, handle))


def read_online_checkpoint(path: Path) -> OnlineCheckpoint:
    """Read a checkpoint; ``ContractError`` (naming the file and field) if it does not fit."""
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as error:
        raise ContractError(path, None, f"cannot load {CONTRACT}: {error}") from error
    check_schema_version(payload, CONTRACT, CHECKPOINT_SCHEMA, path)
    return decode(OnlineCheckpoint, payload, path)
