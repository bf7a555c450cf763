"""The pre-ranker's part of a full release: which pre-ranker goes out (its
quality gate), its files, and the statistics serving reads.

Files added to a full release (each checksummed by the store when it seals):

- ``prerank.pt``: the pre-ranker's weights, vocabularies and catalogue (a
  copy of the model's ``prerank.pt``);
- ``prerank_item_ids.json``, ``prerank_item_rows.npy`` (N, H1) float32,
  ``prerank_item_codes.npy`` (N,) int64: every catalogue item's item-cache
  row and category code, precomputed, what the service fills its item
  cache with;
- ``statistics.npz``: per item and per (user, category) and per user
  counts as of ``statistics_as_of_ms`` (the newest minute every partition
  has closed), from every partition's statistics rows
  (``publisher/statistics_feed.py``; embeddings releases carry newer ones);
- ``prerank.json``: the pre-ranker's version, day, holdout metrics and
  gate, the statistics' time, and its resolved settings.

**Gate**: the newest pre-ranker (``models/prerank/LATEST``) goes out unless
its holdout NDCG@``eval_keep`` against the ranker is more than
``prerank.max_quality_drop`` below its parent's on the same requests;
then it is marked refused and the newest one not refused goes out instead
(no pre-ranker at all when there is none).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from freshtower.publisher.item_cache import CatalogueItems
from freshtower.publisher.statistics_feed import STATISTICS_FILE, StatisticsFeed, statistics_bytes
from freshtower.trainer.artifacts import FullModelRef, is_refused, list_full_models, mark_refused
from freshtower.trainer.prerank_full import WEIGHTS, load_preranker, prerank_models_dir

from freshtower.core.settings import Settings
from freshtower.core.storage import write_file, writing

log = logging.getLogger(__name__)

PRERANK_NOTE = "prerank.json"


def gate_reason(ref: FullModelRef, settings: Settings) -> str | None:
    """Why ``ref`` may not go out (None: it may)."""
    metrics = ref.manifest.metrics
    key = f"ndcg@{settings.prerank.eval_keep}"
    parent = metrics.get("parent") or {}
    new, old = metrics.get(key), parent.get(key)
    if new is None or old is None or new != new or old != old:  # nothing to compare (no holdout, or NaN)
        return None
    drop = settings.prerank.max_quality_drop
    if new < old - drop:
        return f"holdout {key} {new:.4f} is more than {drop} below its parent {parent.get('version')}'s {old:.4f}"
    return None


def choose_preranker(settings: Settings) -> tuple[FullModelRef | None, list[str]]:
    """(the pre-ranker to release or None, the refusals made now)."""
    directory = prerank_models_dir(settings)
    if not directory.is_dir():
        return None, []
    refusals = []
    for ref in reversed(list_full_models(directory)):
        if is_refused(ref):
            continue
        reason = gate_reason(ref, settings)
        if reason is None:
            return ref, refusals
        mark_refused(ref, reason)
        refusals.append(f"pre-ranker {ref.version}: {reason}")
        log.warning("refused pre-ranker %s: %s", ref.version, reason)
    return None, refusals


def write_prerank_files(
    staging: Path, settings: Settings, on_file: Callable[[str], None] = lambda name: None, statistics: StatisticsFeed | None = None
) -> dict | None:
    """Write the pre-ranker's files into a full release being staged; return
    what ``prerank.json`` says (None: no pre-ranker goes out). ``statistics``:
    the publisher's feed (None: read the batches from scratch)."""
    ref, refusals = choose_preranker(settings)
    if ref is None:
        return None
    loaded = load_preranker(ref)
    ids, rows, codes = CatalogueItems(loaded.model).everything()
    if not np.isfinite(rows.numpy()).all():
        mark_refused(ref, "item-cache rows hold NaN or inf")
        return None
    with writing(staging / "prerank.pt"):
        shutil.copyfile(ref.path / WEIGHTS, staging / "prerank.pt")
    on_file("prerank.pt")
    write_file(staging / "prerank_item_ids.json", lambda handle: handle.write(json.dumps(ids).encode()))
    write_file(staging / "prerank_item_rows.npy", lambda handle: np.save(handle, rows.numpy().astype(np.float32)))
    write_file(staging / "prerank_item_codes.npy", lambda handle: np.save(handle, np.asarray(codes, dtype=np.int64)))
    on_file("prerank_item_rows.npy")
    snapshots = (statistics or StatisticsFeed(settings.batches_dir)).snapshot()
    as_of = None
    if snapshots is not None:
        data = statistics_bytes(snapshots)
        write_file(staging / STATISTICS_FILE, lambda handle: handle.write(data))
        as_of = snapshots.as_of_ms
        on_file(STATISTICS_FILE)
    manifest = ref.manifest
    note = {
        "model_version": ref.version,
        "day": manifest.day,
        "data_end_ms": manifest.data_end_ms,
        "metrics": {k: v for k, v in manifest.metrics.items() if k not in ("distillation",)},
        "gate": {"metric": f"ndcg@{settings.prerank.eval_keep}", "max_quality_drop": settings.prerank.max_quality_drop,
                 "refused_now": refusals},
        "items": len(ids),
        "statistics_as_of_ms": as_of,
        "config": manifest.config,
    }
    text = json.dumps(note, sort_keys=True, default=str)
    write_file(staging / PRERANK_NOTE, lambda handle: handle.write(text.encode()))
    on_file(PRERANK_NOTE)
    return note
