"""Versioned full-model artifacts on disk.

Layout under ``<data_dir>/models/full/``::

    2026-11-21.1/            one directory per version: <data day>.<attempt>
        model.pt             weights, vocabularies, catalogue, item-frequency
                             state, optimiser state (torch.save, loads with
                             weights_only=True)
        manifest.json        version, day, parent, created_at, event-time
                             range learnt from, metrics, lineage (the batch
                             files and their SHA-256), resolved config, and
                             the SHA-256 of model.pt
    LATEST                   the newest version's name

A version directory is written under a temporary name, fsynced and renamed
into place, then LATEST is replaced atomically: a reader never sees half an
artifact, and a crash leaves the previous one current.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from freshtower.trainer.model import TwoTowerModel

from freshtower.core.frequency import FrequencyEstimator
from freshtower.core.settings import Settings, settings_from_record
from freshtower.core.storage import atomic_write_bytes, sha256_file

ARTIFACT_FORMAT = 1
_VERSION = re.compile(r"^(\d{4}-\d{2}-\d{2})\.(\d+)$")


class ArtifactError(RuntimeError):
    """A model artifact that is missing, corrupt or does not fit."""


@dataclass(frozen=True)
class FullModelRef:
    version: str
    path: Path
    manifest: dict

    @property
    def day(self) -> str:
        return self.manifest["day"]

    @property
    def data_end_ms(self) -> int:
        """End (exclusive) of the event time the model learnt from."""
        return int(self.manifest["data_end_ms"])


def full_models_dir(settings: Settings) -> Path:
    return settings.models_dir / "full"


def new_model(settings: Settings) -> TwoTowerModel:
    """A randomly initialised model of the configured shape (seeded)."""
    torch.manual_seed(settings.training.seed)
    return TwoTowerModel(settings.model, settings.vocabulary)


def new_estimator(settings: Settings) -> FrequencyEstimator:
    f = settings.frequency
    return FrequencyEstimator(f.buckets, f.hashes, f.alpha)


def _to_tensors(state: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def _to_arrays(state: dict) -> dict:
    return {k: v.numpy() for k, v in state.items()}


def list_full_models(models_dir: Path) -> list[FullModelRef]:
    """Complete versions, oldest first (by day, then attempt)."""
    if not models_dir.is_dir():
        return []
    refs = []
    for path in models_dir.iterdir():
        match = _VERSION.match(path.name)
        if match and (path / "manifest.json").is_file():
            refs.append((match.group(1), int(match.group(2)), path))
    refs.sort()
    return [read_manifest(path) for _, _, path in refs]


def read_manifest(path: Path) -> FullModelRef:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path}: unreadable manifest.json: {error}") from error
    return FullModelRef(manifest["version"], path, manifest)


def latest_full_model(models_dir: Path) -> FullModelRef | None:
    """The version LATEST names, or None if no full model exists yet."""
    pointer = models_dir / "LATEST"
    if not pointer.is_file():
        return None
    version = pointer.read_text().strip()
    if not _VERSION.match(version):
        raise ArtifactError(f"{pointer} names {version!r}, which is not a model version")
    path = models_dir / version
    if not (path / "manifest.json").is_file():
        raise ArtifactError(f"{pointer} names {version}, but {path}/manifest.json is missing")
    return read_manifest(path)


REFUSED_NOTE = "REFUSED.json"


def mark_refused(ref: FullModelRef, reason: str) -> None:
    """Record that the publisher refused to serve this model (e.g. its
    holdout recall dropped): the online trainer will not follow it and no
    later day warm-starts from it."""
    note = {"version": ref.version, "reason": reason, "at": time.time()}
    atomic_write_bytes(ref.path / REFUSED_NOTE, json.dumps(note).encode())


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


def _next_version(models_dir: Path, day: str) -> str:
    date.fromisoformat(day)
    attempts = [int(m.group(2)) for p in models_dir.glob(f"{day}.*") if (m := _VERSION.match(p.name))] if models_dir.is_dir() else []
    return f"{day}.{max(attempts, default=0) + 1}"


def save_full_model(
    models_dir: Path,
    day: str,
    model: TwoTowerModel,
    estimator: FrequencyEstimator,
    optimizer_state: dict,
    manifest_fields: dict,
) -> FullModelRef:
    """Write a new version atomically and point LATEST at it."""
    models_dir.mkdir(parents=True, exist_ok=True)
    version = _next_version(models_dir, day)
    staging = models_dir / f".staging-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        weights_path = staging / "model.pt"
        torch.save(
            {
                "format": ARTIFACT_FORMAT,
                "model": model.export_state(),
                "estimator": _to_tensors(estimator.state_dict()),
                "optimizer": optimizer_state,
            },
            weights_path,
        )
        manifest = {
            "format": ARTIFACT_FORMAT,
            "version": version,
            "day": day,
            "created_at": time.time(),
            **manifest_fields,
            "files": {"model.pt": sha256_file(weights_path)},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        final = models_dir / version
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_bytes(models_dir / "LATEST", version.encode())
    return read_manifest(final)


@dataclass
class LoadedModel:
    ref: FullModelRef
    settings: Settings  # as resolved when the model was trained
    model: TwoTowerModel
    estimator: FrequencyEstimator
    optimizer_state: dict


def load_full_model(ref: FullModelRef, verify: bool = True) -> LoadedModel:
    """Load a version, checking model.pt against its manifest checksum."""
    weights_path = ref.path / "model.pt"
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path} is missing")
    if verify:
        expected = ref.manifest.get("files", {}).get("model.pt")
        actual = sha256_file(weights_path)
        if actual != expected:
            raise ArtifactError(f"{weights_path}: SHA-256 {actual} does not match the manifest's {expected}")
    try:
        payload = torch.load(weights_path, weights_only=True)
    except Exception as error:
        raise ArtifactError(f"{weights_path}: cannot load: {error}") from error
    if payload.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{weights_path}: unsupported artifact format {payload.get('format')!r}")
    settings = settings_from_record(ref.manifest["config"])
    model = TwoTowerModel(settings.model, settings.vocabulary)
    model.import_state(payload["model"])
    estimator = FrequencyEstimator.from_state_dict(_to_arrays(payload["estimator"]))
    return LoadedModel(ref, settings, model, estimator, payload.get("optimizer", {}))
