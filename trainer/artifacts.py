"""Versioned full-model artifacts on disk.

Layout under ``<data_dir>/models/full/`` (a ``VersionedStore``)::

    2026-11-21.1/            one directory per version: <data day>.<attempt>
        model.pt             weights, vocabularies, catalogue, item-frequency
                             state, optimiser state (torch.save, loads with
                             weights_only=True)
        manifest.json        ``FullModelManifest``: version, day, parent,
                             created_at, event-time range learnt from,
                             metrics, lineage (the batch files and their
                             SHA-256), resolved config, and the SHA-256 and
                             size of model.pt
        REFUSED.json         only if the publisher refused to serve it (a note,
                             not part of the sealed version)
    LATEST                   the newest version's name

A version directory is written under a temporary name, fsynced and renamed
into place, then LATEST is replaced atomically: a reader never sees half an
artifact, and a crash leaves the previous one current.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from freshtower.trainer.model import TwoTowerModel

from freshtower.core.contracts import ContractError, FullModelManifest, TrainingRecord
from freshtower.core.frequency import FrequencyEstimator
from freshtower.core.settings import Settings, settings_from_record
from freshtower.core.storage import FileDigest, write_file
from freshtower.core.versioned_store import VersionedStore

WEIGHTS_FORMAT = 1  # layout of model.pt
WEIGHTS = "model.pt"
POINTER = "LATEST"
REFUSED_NOTE = "REFUSED.json"
_VERSION = re.compile(r"^(\d{4}-\d{2}-\d{2})\.(\d+)$")


class ArtifactError(RuntimeError):
    """A model artifact that is missing, corrupt or does not fit."""


@dataclass(frozen=True)
class FullModelRef:
    version: str
    path: Path
    manifest: FullModelManifest

    @property
    def day(self) -> str:
        return self.manifest.day

    @property
    def data_end_ms(self) -> int:
        """End (exclusive) of the event time the model learnt from."""
        return self.manifest.data_end_ms


def _version_key(name: str) -> tuple[str, int] | None:
    """Order of versions: by day, then attempt (``2026-11-21.10`` after ``.9``)."""
    match = _VERSION.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else None


def check_model_version(text: str) -> str:
    """``text`` if it names a full-model version, else ValueError.

    >>> check_model_version("2026-11-21.1")
    '2026-11-21.1'
    """
    if not isinstance(text, str) or _version_key(text) is None:
        raise ValueError(f"{text!r} is not a model version (expected <YYYY-MM-DD>.<attempt>, e.g. 2026-11-21.1)")
    return text


def full_model_store(models_dir: Path) -> VersionedStore:
    """The full models under ``models_dir``, behind ``LATEST``."""
    return VersionedStore(
        models_dir,
        pointer=POINTER,
        version_key=_version_key,
        check_version=check_model_version,
        error=ArtifactError,
        notes=(REFUSED_NOTE,),
    )


def full_models_dir(settings: Settings) -> Path:
    return settings.models_dir / "full"


def new_model(settings: Settings) -> TwoTowerModel:
    """A randomly initialised model of the configured shape (seeded)."""
    torch.manual_seed(settings.training.seed)
    return TwoTowerModel(settings.model, settings.vocabulary)


def new_estimator(settings: Settings) -> FrequencyEstimator:
    f = settings.frequency
    return FrequencyEstimator(f.buckets, f.hashes, f.alpha)


def estimator_tensors(estimator: FrequencyEstimator) -> dict[str, torch.Tensor]:
    """The estimator's state as tensors (what ``weights_only`` files hold)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in estimator.state_dict().items()}


def estimator_from_tensors(state: dict[str, torch.Tensor]) -> FrequencyEstimator:
    """Inverse of ``estimator_tensors``."""
    return FrequencyEstimator.from_state_dict({k: v.numpy() for k, v in state.items()})


# --- reading ---------------------------------------------------------------------------


def _ref(store: VersionedStore, version: str) -> FullModelRef:
    where = store.manifest_location(version)
    raw = store.manifest_bytes(version)
    if raw is None:
        raise ArtifactError(f"{where} is missing")
    try:
        manifest = FullModelManifest.from_json(raw, where)
    except ContractError as error:
        raise ArtifactError(str(error)) from error
    if manifest.version != version:
        raise ArtifactError(f"{where}: field 'version' is {manifest.version!r}, but the directory is {version}")
    return FullModelRef(version, store.path_of(version), manifest)


def list_full_models(models_dir: Path) -> list[FullModelRef]:
    """Complete versions, oldest first (by day, then attempt)."""
    store = full_model_store(models_dir)
    return [_ref(store, v) for v in store.versions()]


def read_manifest(path: Path) -> FullModelRef:
    """The full model in the version directory ``path``."""
    path = Path(path)
    return _ref(full_model_store(path.parent), path.name)


def latest_full_model(models_dir: Path) -> FullModelRef | None:
    """The version LATEST names, or None if no full model exists yet."""
    store = full_model_store(models_dir)
    version = store.pointer()
    if version is None:
        return None
    if store.manifest_bytes(version) is None:
        raise ArtifactError(f"{models_dir / POINTER} names {version}, but {store.manifest_location(version)} is missing")
    return _ref(store, version)


def mark_refused(ref: FullModelRef, reason: str, now_s: float | None = None) -> None:
    """Record that the publisher refused to serve this model (e.g. its
    holdout recall dropped): the online trainer will not follow it and no
    later day warm-starts from it. ``now_s``: wall time (default: now)."""
    note = {"version": ref.version, "reason": reason, "at": time.time() if now_s is None else now_s}
    full_model_store(ref.path.parent).write_note(REFUSED_NOTE, note, version=ref.version)


def refusal(ref: FullModelRef) -> str | None:
    """Why the publisher refused this model, or None if it did not."""
    note = full_model_store(ref.path.parent).read_note(REFUSED_NOTE, version=ref.version)
    return None if note is None else str(note.get("reason", "refused"))


def is_refused(ref: FullModelRef) -> bool:
    return (ref.path / REFUSED_NOTE).is_file()


def servable_full_model(models_dir: Path) -> FullModelRef | None:
    """The newest full model the publisher has not refused (what serving
    can run, so what the online trainer follows)."""
    latest = latest_full_model(models_dir)
    if latest is None or not is_refused(latest):
        return latest
    candidates = [r for r in list_full_models(models_dir) if not is_refused(r)]
    return candidates[-1] if candidates else None


def previous_full_model(models_dir: Path, before_day: str) -> FullModelRef | None:
    """The newest model trained on a day before ``before_day`` that was not
    refused (warm start)."""
    candidates = [r for r in list_full_models(models_dir) if r.day < before_day and not is_refused(r)]
    return candidates[-1] if candidates else None


# --- writing ---------------------------------------------------------------------------


def _next_version(store: VersionedStore, day: str) -> str:
    date.fromisoformat(day)
    attempts = [key[1] for v in store.versions() if (key := _version_key(v)) is not None and key[0] == day]
    return f"{day}.{max(attempts, default=0) + 1}"


def save_full_model(
    models_dir: Path,
    day: str,
    model: TwoTowerModel,
    estimator: FrequencyEstimator,
    optimizer_state: dict,
    record: TrainingRecord,
) -> FullModelRef:
    """Write a new version atomically and point LATEST at it."""
    store = full_model_store(models_dir)
    version = _next_version(store, day)
    created_at = time.time()

    def manifest(files: dict[str, FileDigest]) -> bytes:
        fields = {name: getattr(record, name) for name in TrainingRecord.__dataclass_fields__}
        return FullModelManifest(version=version, day=day, created_at=created_at, files=files, **fields).to_json()

    with store.staging(version) as staging:
        payload = {
            "format": WEIGHTS_FORMAT,
            "model": model.export_state(),
            "estimator": estimator_tensors(estimator),
            "optimizer": optimizer_state,
        }
        write_file(staging / WEIGHTS, lambda handle: torch.save(payload, handle))  # torch's own errors name no file
        store.seal(staging, version, manifest)
    store.set_pointer(version)
    return _ref(store, version)


def adopt_full_model(ref: FullModelRef, models_dir: Path) -> FullModelRef:
    """Copy a sealed version from another store into ``models_dir`` under
    its own name, sealed the same way, and point LATEST at it."""
    store = full_model_store(models_dir)
    with store.staging(ref.version) as staging:
        for name in ref.manifest.files:
            shutil.copyfile(ref.path / name, staging / name)
        store.seal(staging, ref.version, lambda files: _same_files(ref, files))
    store.set_pointer(ref.version)
    return _ref(store, ref.version)


def _same_files(ref: FullModelRef, files: dict[str, FileDigest]) -> bytes:
    if files != ref.manifest.files:
        raise ArtifactError(f"copy of {ref.path} does not match its manifest: {files} != {ref.manifest.files}")
    return ref.manifest.to_json()


def retain_full_models(models_dir: Path, keep: int) -> list[str]:
    """Remove versions beyond the newest ``keep``, never the one LATEST
    names nor the servable one (what serving and the online trainer run)."""
    servable = servable_full_model(models_dir)
    return full_model_store(models_dir).retain(keep, protect=() if servable is None else (servable.version,))


# --- loading ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    ref: FullModelRef
    settings: Settings  # as resolved when the model was trained
    model: TwoTowerModel
    estimator: FrequencyEstimator
    optimizer_state: dict


def load_full_model(ref: FullModelRef, verify: bool = True) -> LoadedModel:
    """Load a version, checking model.pt against its manifest (size, SHA-256)."""
    weights_path = ref.path / WEIGHTS
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path} is missing")
    if verify:
        full_model_store(ref.path.parent).verify(ref.version, ref.manifest.files, where=f"full model {ref.version}")
    try:
        payload = torch.load(weights_path, weights_only=True)
    except Exception as error:
        raise ArtifactError(f"{weights_path}: cannot load: {error}") from error
    if payload.get("format") != WEIGHTS_FORMAT:
        raise ArtifactError(f"{weights_path}: unsupported weights format {payload.get('format')!r}")
    settings = settings_from_record(ref.manifest.config)
    model = TwoTowerModel(settings.model, settings.vocabulary)
    model.import_state(payload["model"])
    estimator = estimator_from_tensors(payload["estimator"])
    return LoadedModel(ref, settings, model, estimator, payload.get("optimizer", {}))
