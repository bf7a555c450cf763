"""The release manifest: ``<releases_dir>/<8 digits>-<kind>/manifest.json``.

Two kinds share most fields: a ``full`` release (user tower, every user
ID row, item vectors and their index) and an ``embeddings`` release (the
user ID rows changed since its parent, and the vectors of the items first
seen since its full release). Written (last, when the release is
sealed) by the publisher through ``publisher.releases.ReleaseStore``; read
through it by the recall service, served-recall scoring and ``freshtower
run``. ``format`` is the schema version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from freshtower.core.contracts.validation import CONTRACT_CONFIG, ContractError, as_json_bytes, check_schema_version, decode_json
from freshtower.core.storage import FileDigest

RELEASE_SCHEMA = 2  # 2: embeddings releases carry new_items
CONTRACT = "release manifest"


@dataclass(frozen=True, kw_only=True)
class EventTimeRange:
    __pydantic_config__ = CONTRACT_CONFIG

    start_ms: int | None
    end_ms: int | None


@dataclass(frozen=True, kw_only=True)
class Dims:
    __pydantic_config__ = CONTRACT_CONFIG

    id_dim: int  # user ID embedding width
    output_dim: int  # tower output (item vector) width


@dataclass(frozen=True, kw_only=True)
class IndexCandidate:
    """One index kind the publisher built and tuned for a full release."""

    __pydantic_config__ = CONTRACT_CONFIG

    kind: str  # "ivf" or "hnsw"
    build_seconds: float
    parameter: str  # "nprobe" or "efSearch"
    value: int  # the smallest on its ladder that met the target (else the largest)
    recall_at_100_vs_exact: float
    p99_ms: float  # single-query search
    meets_target: bool


@dataclass(frozen=True, kw_only=True)
class IndexSummary:
    __pydantic_config__ = CONTRACT_CONFIG

    kind: str  # "IndexFlatIP" (exact), "ivf" or "hnsw"
    settings: dict[str, Any]  # IndexSettings (serving builds a release's new-item index with them)
    build_seconds: float  # of the served index
    recall_at_100_vs_exact: float  # of the index against exact search, on check_queries user vectors
    check_queries: int
    recall_target: float | None = None  # what the choice aimed at
    search_parameter: str | None = None  # "nprobe" or "efSearch" as stored in the index; None for exact search
    search_value: int | None = None
    p99_ms: float | None = None  # single-query search of the served index on the check users
    choice_seconds: float | None = None  # oracle, builds, tuning and timing of every candidate
    candidates: tuple[IndexCandidate, ...] = ()  # every kind built (the served one among them)
    choice_settings: dict[str, Any] = field(default_factory=dict)  # the publisher settings the choice followed


@dataclass(frozen=True, kw_only=True)
class RecallChecks:
    __pydantic_config__ = CONTRACT_CONFIG

    holdout_recall_at_50: float | None  # of the model released
    active_holdout_recall_at_50: float | None  # of the full release active when it was checked
    max_recall_drop: float
    baseline_recall_at_50: float | None = None  # what the gate compared with (the paired parent when it could)
    baseline: str | None = None  # which, in words
    holdout_clicks: int | None = None


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    """The released full model's manifest, in brief."""

    __pydantic_config__ = CONTRACT_CONFIG

    version: str
    day: str
    parent: str | None
    created_at: float
    metrics: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class CheckpointRead:
    """What an embeddings release took from one online checkpoint."""

    __pydantic_config__ = CONTRACT_CONFIG

    step: int  # the checkpoint's step
    since: int  # rows changed after this step were taken
    rows: int
    written_at: float | None


@dataclass(frozen=True, kw_only=True)
class NewItems:
    """The items an embeddings release adds to its full release's index:
    every item first seen since the full model's data ended (not only since
    the parent release), embedded by that model's frozen item tower."""

    __pydantic_config__ = CONTRACT_CONFIG

    count: int  # rows of new_item_vectors.npy, IDs in new_item_ids.json
    seen_since_ms: int  # first seen in batches at or after this event time (the full model's data end)
    seconds: float  # to embed them


NEW_ITEM_IDS = "new_item_ids.json"
NEW_ITEM_VECTORS = "new_item_vectors.npy"


@dataclass(frozen=True, kw_only=True)
class _ReleaseFields:
    __pydantic_config__ = CONTRACT_CONFIG

    format: int = RELEASE_SCHEMA
    version: str  # <8-digit sequence>-<kind>
    parent: str | None  # the release this one was built on (a delta applies on top of it)
    full_version: str  # the full release at the root of its chain
    model_version: str  # the full model whose towers it belongs to
    created_at: float  # wall time, seconds
    online_steps: dict[str, int]  # checkpoint file -> step whose rows it holds ({} for full: step 0)
    checkpoint_event_time_ms: int  # newest event time the trainers had learnt from
    event_time: EventTimeRange  # of the clicks its rows learnt from
    newest_click_event_time_ms: int  # freshness: the newest click anything served learnt from
    newest_click_is_bound: bool  # True: newest_click_event_time_ms is only an upper bound
    rows: dict[str, int]  # "user_embeddings" (and "items" for full)
    dims: Dims
    config: dict[str, Any]  # the publisher's resolved settings
    files: dict[str, FileDigest]  # every file of the release

    def to_json(self) -> bytes:
        return as_json_bytes(self)


@dataclass(frozen=True, kw_only=True)
class FullReleaseManifest(_ReleaseFields):
    kind: Literal["full"] = "full"
    index: IndexSummary
    checks: RecallChecks
    model: ModelSummary


@dataclass(frozen=True, kw_only=True)
class PrerankRows:
    """The pre-ranker's user ID rows an embeddings release carries
    (``prerank_user_ids.json``, ``prerank_user_rows.npy``,
    ``prerank_row_event_time_ms.npy``): every row the online trainers changed
    since they forked from ``model_version``, the pre-ranker of the chain's
    full release. Serving writes them over that pre-ranker's user table."""

    __pydantic_config__ = CONTRACT_CONFIG

    model_version: str  # the daily pre-ranker (models/prerank/<day>.<n>) the rows belong to
    count: int  # rows
    id_dim: int
    newest_event_time_ms: int | None  # the newest ranking sample they learnt from (None: no rows)


@dataclass(frozen=True, kw_only=True)
class EmbeddingsReleaseManifest(_ReleaseFields):
    kind: Literal["embeddings"] = "embeddings"
    checkpoints: dict[str, CheckpointRead]  # checkpoint file -> what was taken from it
    resync: list[str]  # checkpoints whose trainer restarted from its base: every row was sent
    new_items: NewItems | None = None  # None: publisher.new_item_vectors was off (no new-item files)
    prerank: PrerankRows | None = None  # None: no pre-ranker rows (none learnt online for the served pre-ranker)
    # the time of its statistics.npz, a complete snapshot that replaces the
    # full release's (None: it carries none: no pre-ranker served, or prerank.embeddings_statistics off)
    statistics_as_of_ms: int | None = None


ReleaseManifest = FullReleaseManifest | EmbeddingsReleaseManifest
_KINDS: dict[str, type[FullReleaseManifest] | type[EmbeddingsReleaseManifest]] = {
    "full": FullReleaseManifest,
    "embeddings": EmbeddingsReleaseManifest,
}


def release_manifest_from_json(raw: bytes, where: Path | str = "<release manifest>") -> ReleaseManifest:
    """Read either kind (by its ``kind`` field).

    >>> manifest = EmbeddingsReleaseManifest(version="00000002-embeddings", parent="00000001-full",
    ...     full_version="00000001-full", model_version="2026-11-20.1", created_at=0.0, online_steps={"checkpoint.pt": 7},
    ...     checkpoint_event_time_ms=60_000, event_time=EventTimeRange(start_ms=1_000, end_ms=59_000),
    ...     newest_click_event_time_ms=59_000, newest_click_is_bound=False, rows={"user_embeddings": 2},
    ...     dims=Dims(id_dim=16, output_dim=32), config={}, files={},
    ...     checkpoints={"checkpoint.pt": CheckpointRead(step=7, since=0, rows=2, written_at=None)}, resync=[])
    >>> release_manifest_from_json(manifest.to_json()) == manifest
    True
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ContractError(where, None, f"not JSON: {error}") from None
    check_schema_version(data, CONTRACT, RELEASE_SCHEMA, where)
    cls = _KINDS.get(data.get("kind"))
    if cls is None:
        raise ContractError(where, "kind", f"is {data.get('kind')!r}: expected one of {sorted(_KINDS)}")
    return decode_json(cls, raw, CONTRACT, RELEASE_SCHEMA, where)
