"""What one process writes and another reads, as typed, versioned contracts.

Each contract is a frozen dataclass with a schema version (its ``format``
field) and one reader and one writer; a file that does not fit fails at
load with a ``ContractError`` naming the file and the field. The batch
manifest, the fourth hand-off, lives with the batch format
(``freshtower.core.batches.layout.BatchManifest``).
"""

from freshtower.core.contracts.full_model import FULL_MODEL_SCHEMA, FullModelManifest, LineageEntry, TrainingRecord
from freshtower.core.contracts.release_manifest import (
    RELEASE_SCHEMA,
    CheckpointRead,
    Dims,
    EmbeddingsReleaseManifest,
    EventTimeRange,
    FullReleaseManifest,
    IndexCandidate,
    IndexSummary,
    ModelSummary,
    NewItems,
    PrerankRows,
    RecallChecks,
    ReleaseManifest,
    release_manifest_from_json,
)
from freshtower.core.contracts.validation import ContractError
from freshtower.core.contracts.vocabulary import VocabularyState

__all__ = [
    "FULL_MODEL_SCHEMA",
    "RELEASE_SCHEMA",
    "CheckpointRead",
    "ContractError",
    "Dims",
    "EmbeddingsReleaseManifest",
    "EventTimeRange",
    "FullModelManifest",
    "FullReleaseManifest",
    "IndexCandidate",
    "IndexSummary",
    "LineageEntry",
    "ModelSummary",
    "NewItems",
    "PrerankRows",
    "RecallChecks",
    "ReleaseManifest",
    "TrainingRecord",
    "VocabularyState",
    "release_manifest_from_json",
]
