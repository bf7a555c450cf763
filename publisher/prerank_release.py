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
  has closed), from every partition's statistics rows;
- ``prerank.json``: the pre-ranker's version, day, holdout metrics and
  gate, the statistics' time, and its resolved settings.

**Gate**: the newest pre-ranker (``models/prerank/LATEST``) goes out unless
its holdout NDCG@``eval_keep`` against the ranker is more than
``prerank.max_quality_drop`` below its parent's on the same requests;
then it is marked refused and the newest one not refused goes out instead
(no pre-ranker at all when there is none).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from freshtower.publisher.item_cache import CatalogueItems
from freshtower.trainer.artifacts import FullModelRef, is_refused, list_full_models, mark_refused
from freshtower.trainer.prerank_full import WEIGHTS, load_preranker, prerank_models_dir

from freshtower.core.batches import list_batches
from freshtower.core.batches.ranking import read_statistics_rows
from freshtower.core.eventtime import HOUR_MS, MINUTE_MS
from freshtower.core.settings import Settings
from freshtower.core.storage import write_file, writing
from freshtower.core.statistics import CountsSnapshot, ItemStatistics, UserStatistics, item_count_deltas

log = logging.getLogger(__name__)

PRERANK_NOTE = "prerank.json"
STATISTICS_FILE = "statistics.npz"


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


@dataclass(frozen=True)
class StatisticsSnapshots:
    as_of_ms: int
    items: CountsSnapshot
    by_category: CountsSnapshot
    by_user: CountsSnapshot


def statistics_snapshots(batches_dir: Path) -> StatisticsSnapshots | None:
    """The statistics as of the newest minute every partition has closed,
    from the statistics rows of the last two days' batches (None: none)."""
    batches_dir = Path(batches_dir)
    days = sorted(p.name for p in batches_dir.iterdir() if p.is_dir() and p.name[:1].isdigit())[-2:] if batches_dir.is_dir() else []
    refs = [r for day in days for r in list_batches(batches_dir, day)]
    if not refs:
        return None
    newest: dict[str, int] = {}
    for ref in refs:
        part = ref.manifest_path.stem.rsplit("-", 1)[-1] if "-" in ref.manifest_path.stem else ""
        newest[part] = max(newest.get(part, 0), ref.manifest.window_end_ms)
    as_of = min(newest.values()) // MINUTE_MS * MINUTE_MS
    items, users = ItemStatistics(), UserStatistics()
    for ref in refs:
        if ref.window_start_ms < as_of - 25 * HOUR_MS:
            continue
        rows = read_statistics_rows(ref)
        if rows is not None:
            items.apply(item_count_deltas(rows))
            users.add(rows)
    by_category, by_user = users.snapshots(as_of)
    return StatisticsSnapshots(as_of, items.snapshot(as_of), by_category, by_user)


def statistics_bytes(snapshots: StatisticsSnapshots) -> bytes:
    buffer = io.BytesIO()
    arrays = {}
    for name in ("items", "by_category", "by_user"):
        snapshot: CountsSnapshot = getattr(snapshots, name)
        arrays[f"{name}_keys"], arrays[f"{name}_counts"] = snapshot.keys, snapshot.counts
    np.savez(buffer, as_of_ms=np.int64(snapshots.as_of_ms), **arrays)
    return buffer.getvalue()


def load_statistics(path: Path) -> StatisticsSnapshots:
    with np.load(path, allow_pickle=False) as npz:
        as_of = int(npz["as_of_ms"])
        parts = {name: CountsSnapshot(as_of, npz[f"{name}_keys"], npz[f"{name}_counts"]) for name in ("items", "by_category", "by_user")}
    return StatisticsSnapshots(as_of, **parts)


def write_prerank_files(staging: Path, settings: Settings, on_file: Callable[[str], None] = lambda name: None) -> dict | None:
    """Write the pre-ranker's files into a full release being staged; return
    what ``prerank.json`` says (None: no pre-ranker goes out)."""
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
    snapshots = statistics_snapshots(settings.batches_dir)
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
