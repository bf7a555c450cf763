"""The pre-ranker's online user ID rows in an embeddings release.

The online trainers learn the pre-ranker's user rows beside the retrieval
model's (``trainer/prerank_online.py``) and keep them in their checkpoints
(``PrerankUserRows``). An embeddings release carries every row they changed
since forking from the pre-ranker of the chain's full release (not only
those since the parent: later links replace earlier ones row by row, and
a partition that is not read this time keeps its rows of the last link
that read it): ``prerank_user_ids.json``, ``prerank_user_rows.npy`` (n,
id_dim) float32, ``prerank_row_event_time_ms.npy`` (n,) int64, listed with
their SHA-256 in the manifest and described by its ``prerank``
(``PrerankRows``). Rows forked from another pre-ranker than the served one
are left out (another model's space).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from freshtower.core.contracts import PrerankRows
from freshtower.core.contracts.online_checkpoint import OnlineCheckpoint

PRERANK_USER_IDS = "prerank_user_ids.json"
PRERANK_USER_ROWS = "prerank_user_rows.npy"
PRERANK_ROW_EVENT_TIME = "prerank_row_event_time_ms.npy"


@dataclass(frozen=True)
class PrerankRowsPart:
    user_ids: list[str]
    rows: np.ndarray  # (n, id_dim) float32
    event_time_ms: np.ndarray  # (n,) int64
    summary: PrerankRows


def prerank_rows(model_version: str | None, checkpoints: Iterable[OnlineCheckpoint]) -> PrerankRowsPart | None:
    """The changed pre-ranker rows of ``checkpoints`` forked from ``model_version`` (None: none)."""
    if model_version is None:
        return None
    ids, rows, times = [], [], []
    for checkpoint in checkpoints:
        saved = checkpoint.prerank
        if saved is None or saved.base_version != model_version:
            continue
        changed = np.flatnonzero(saved.row_updated_step.numpy() > 0)
        row_ids = saved.user_ids.row_ids
        index = torch.from_numpy(changed)
        ids += [row_ids[r] for r in changed.tolist()]
        rows.append(saved.user_table[index].numpy().astype(np.float32))
        times.append(saved.row_event_time_ms[index].numpy().astype(np.int64))
    if not ids:
        return None
    table, event_times = np.concatenate(rows), np.concatenate(times)
    learnt = event_times[event_times > 0]
    summary = PrerankRows(model_version=model_version, count=len(ids), id_dim=int(table.shape[1]),
                          newest_event_time_ms=int(learnt.max()) if len(learnt) else None)
    return PrerankRowsPart(ids, table, event_times, summary)
