"""The full-model manifest: ``<data_dir>/models/full/<day>.<attempt>/manifest.json``.

Written (last, when the version is sealed) by the daily full trainer
through ``trainer.artifacts.save_full_model``; read through
``trainer.artifacts`` by the online trainer (which model to fork from),
the publisher (what a full release is built from, its holdout recall) and
``freshtower run`` (the summary). ``format`` is the schema version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from freshtower.core.contracts.validation import CONTRACT_CONFIG, as_json_bytes, decode_json
from freshtower.core.storage import FileDigest

FULL_MODEL_SCHEMA = 2
CONTRACT = "full-model manifest"


@dataclass(frozen=True, kw_only=True)
class LineageEntry:
    """One batch file the model learnt from (or was scored on)."""

    __pydantic_config__ = CONTRACT_CONFIG

    file: str  # relative to the batches directory
    sha256: str  # of the batch file, from its manifest
    positives: int
    role: Literal["train", "holdout"]


@dataclass(frozen=True, kw_only=True)
class TrainingRecord:
    """What the full trainer records about the model it writes."""

    __pydantic_config__ = CONTRACT_CONFIG

    parent: str | None  # the version it warm-started from
    from_scratch: bool
    data_start_ms: int  # event time learnt from: [data_start_ms, data_end_ms), the whole day
    data_end_ms: int  # the end of the day; the online trainer forks from here
    newest_click_event_time_ms: int | None  # freshness of a full release
    holdout_start_ms: int  # the gate's clicks: [holdout_start_ms, holdout_end_ms), the next day's
    holdout_end_ms: int  # first training.holdout_seconds, which the next models do learn
    metrics: dict[str, Any]  # holdout evaluation ("exact", "faiss": {"recall@K": ...}) and training figures
    lineage: list[LineageEntry]
    config: dict[str, Any]  # the resolved settings (Settings.as_record())

    def holdout_recall(self, k: int = 50) -> float | None:
        """Exact-search holdout Recall@k, if it was measured."""
        return self.metrics.get("exact", {}).get(f"recall@{k}")

    @property
    def train_samples(self) -> int:
        return int(self.metrics.get("train_samples", 0))


@dataclass(frozen=True, kw_only=True)
class FullModelManifest(TrainingRecord):
    """
    >>> manifest = FullModelManifest(version="2026-11-21.1", day="2026-11-21", created_at=0.0, parent=None,
    ...     from_scratch=True, data_start_ms=0, data_end_ms=60_000, newest_click_event_time_ms=59_000,
    ...     holdout_start_ms=60_000, holdout_end_ms=120_000, metrics={"exact": {"recall@50": 0.25}}, lineage=[], config={},
    ...     files={"model.pt": FileDigest(sha256="0" * 64, bytes=10)})
    >>> FullModelManifest.from_json(manifest.to_json()) == manifest
    True
    >>> manifest.holdout_recall(50)
    0.25
    """

    format: int = FULL_MODEL_SCHEMA
    version: str  # <day>.<attempt>
    day: str  # YYYY-MM-DD, the data day
    created_at: float  # wall time, seconds
    files: dict[str, FileDigest]  # model.pt: weights, vocabularies, catalogue, estimator, optimiser state

    def to_json(self) -> bytes:
        return as_json_bytes(self)

    @classmethod
    def from_json(cls, raw: bytes, where: Path | str = "<full-model manifest>") -> "FullModelManifest":
        return decode_json(cls, raw, CONTRACT, FULL_MODEL_SCHEMA, where)
