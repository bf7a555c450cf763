"""The release store: immutable, versioned releases behind one atomic pointer.

Embedded default: a local directory, ``settings.releases_dir``::

    ACTIVE                      the version being served (replaced atomically)
    activations.jsonl           append-only: every activation (version, wall time, by, previous)
    kafka.json                  newest release whose rows went to the user-embeddings topic
    .lock                       flock for pointer updates, commits and retention (held briefly)
    .publisher.lock             flock held by the one running publisher
    .staging-<version>-<pid>/   a release being written: never read, removed by the next publisher
    00000001-full/              manifest.json, user_tower.pt, user_embeddings.npy, user_ids.json,
                                item_vectors.npy, item_ids.json, index.faiss
    00000002-embeddings/        manifest.json, user_embeddings.npy, user_ids.json, row_event_time_ms.npy

A version is ``<8-digit sequence>-<kind>``; the sequence orders releases.
A release is written under a staging name, every file fsynced, its
manifest (with the SHA-256 and size of every file) written last, and the
directory renamed to its version: a reader never sees half a release.
It becomes visible to serving only when ``ACTIVE`` names it. A publisher
killed at any point leaves ``ACTIVE`` and the release it names untouched.

An ``embeddings`` release holds only the user ID rows that changed since
its parent; what serving loads is a *chain*: the full release at its root,
then each embeddings release in order (``chain``). Retention keeps the
newest ``keep_releases`` releases, the active chain, and every release the
kept ones need.

Version strings that arrive from outside (HTTP) go through
``parse_version`` before they touch a path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from freshtower.core.storage import atomic_write_text, fsync_dir, sha256_file

RELEASE_FORMAT = 1
MANIFEST = "manifest.json"
POINTER = "ACTIVE"
ACTIVATIONS = "activations.jsonl"
_VERSION = re.compile(r"^([0-9]{8})-(full|embeddings)$")
Kind = Literal["full", "embeddings"]


class ReleaseError(RuntimeError):
    """A release that is missing, incomplete, corrupt or does not fit."""


class ReleaseNotFound(ReleaseError, KeyError):
    """No release of that version in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ActiveChanged(ReleaseError):
    """The active release moved while a release was being built on it."""


def parse_version(text: str) -> str:
    """Return ``text`` if it is a well-formed release version, else raise ValueError.

    >>> parse_version("00000042-full")
    '00000042-full'
    >>> parse_version("../../etc/passwd")
    Traceback (most recent call last):
    ...
    ValueError: '../../etc/passwd' is not a release version (expected 8 digits, '-', then 'full' or 'embeddings', e.g. 00000042-full)
    """
    if not isinstance(text, str) or not _VERSION.fullmatch(text):
        raise ValueError(f"{text!r} is not a release version (expected 8 digits, '-', then 'full' or 'embeddings', e.g. 00000042-full)")
    return text


def format_version(sequence: int, kind: Kind) -> str:
    """The version string of the ``sequence``-th release.

    >>> format_version(7, "embeddings")
    '00000007-embeddings'
    """
    return parse_version(f"{sequence:08d}-{kind}")


@dataclass(frozen=True)
class Release:
    """One sealed release: its directory and manifest."""

    version: str
    path: Path
    manifest: dict

    @property
    def kind(self) -> Kind:
        return self.manifest["kind"]

    @property
    def parent(self) -> str | None:
        return self.manifest.get("parent")

    @property
    def sequence(self) -> int:
        return int(self.version.split("-", 1)[0])

    @property
    def model_version(self) -> str:
        """The full-model artifact whose towers this release belongs to."""
        return self.manifest["model_version"]

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise ReleaseError(f"release {self.version}: manifest lists no file {name!r}")
        return self.path / name


class ReleaseStore:
    """Releases under one directory; see the module docstring for the layout."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # --- reading -------------------------------------------------------------

    def path_of(self, version: str) -> Path:
        return self.root / parse_version(version)

    def get(self, version: str) -> Release:
        path = self.path_of(version)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ReleaseNotFound(f"no release {version} in {self.root}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ReleaseError(f"{manifest_path}: unreadable manifest: {error}") from error
        if manifest.get("version") != version or manifest.get("format") != RELEASE_FORMAT:
            raise ReleaseError(f"{manifest_path}: names version {manifest.get('version')!r}, format {manifest.get('format')!r}")
        return Release(version, path, manifest)

    def versions(self) -> list[str]:
        """Sealed releases, oldest first (staging directories are not listed)."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if _VERSION.fullmatch(p.name) and (p / MANIFEST).is_file()]
        return sorted(found)

    def list(self) -> list[Release]:
        return [self.get(v) for v in self.versions()]

    def active_version(self) -> str | None:
        pointer = self.root / POINTER
        try:
            text = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return parse_version(text)
        except ValueError as error:
            raise ReleaseError(f"{pointer}: {error}") from error

    def active(self) -> Release | None:
        version = self.active_version()
        return None if version is None else self.get(version)

    def chain(self, version: str) -> list[Release]:
        """The full release at the root, then every embeddings release down to
        ``version``: what serving must load to serve ``version``."""
        chain = [self.get(version)]
        while chain[-1].kind != "full":
            parent = chain[-1].parent
            if parent is None:
                raise ReleaseError(f"embeddings release {chain[-1].version} has no parent")
            try:
                release = self.get(parent)
            except ReleaseNotFound as error:
                raise ReleaseError(f"release {version} needs {parent}, which is gone: {error}") from error
            if release.model_version != chain[-1].model_version:
                raise ReleaseError(
                    f"release {chain[-1].version} (model {chain[-1].model_version}) sits on {parent} (model {release.model_version})"
                )
            chain.append(release)
        return chain[::-1]

    def verify(self, version: str) -> Release:
        """Check every file of ``version`` against its manifest (SHA-256 and size)."""
        release = self.get(version)
        listed = release.manifest.get("files", {})
        present = {p.name for p in release.path.iterdir()} - {MANIFEST}
        if extra := sorted(present - set(listed)):
            raise ReleaseError(f"release {version}: files not in the manifest: {extra}")
        for name, expected in listed.items():
            path = release.path / name
            if not path.is_file():
                raise ReleaseError(f"release {version}: {path} is missing")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise ReleaseError(f"release {version}: {path} has {size} bytes, the manifest says {expected['bytes']}")
            actual = sha256_file(path)
            if actual != expected["sha256"]:
                raise ReleaseError(f"release {version}: {path} SHA-256 {actual} does not match the manifest's {expected['sha256']}")
        return release

    def activations(self) -> list[dict]:
        """Every activation, oldest first (a torn last line from a crash is skipped)."""
        path = self.root / ACTIVATIONS
        if not path.is_file():
            return []
        entries = []
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def read_note(self, name: str) -> dict | None:
        """A small JSON state file at the root (e.g. ``kafka.json``), or None."""
        path = self.root / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as error:
            raise ReleaseError(f"{path}: unreadable: {error}") from error

    # --- writing (the publisher) ------------------------------------------------

    def write_note(self, name: str, note: dict) -> None:
        if name in (POINTER, ACTIVATIONS) or "/" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a note name")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / name, json.dumps(note, sort_keys=True))

    def next_version(self, kind: Kind) -> str:
        """Only the publisher, holding ``publisher_lock``, allocates versions."""
        sequences = [int(v.split("-", 1)[0]) for v in self.versions()]
        return format_version(max(sequences, default=0) + 1, kind)

    def staging_dir(self, version: str) -> Path:
        path = self.root / f".staging-{parse_version(version)}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def seal(self, staging: Path, version: str, manifest: dict) -> Release:
        """Checksum every file in ``staging``, write the manifest last, fsync
        and rename the directory to ``version``. Not active yet."""
        files = {}
        for path in sorted(staging.iterdir()):
            if path.name == MANIFEST or not path.is_file():
                raise ReleaseError(f"{path}: unexpected entry in a staging directory")
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = {"format": RELEASE_FORMAT, "version": version, **manifest, "files": files}
        with open(staging / MANIFEST, "w") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(staging)
        final = self.path_of(version)
        if final.exists():
            raise ReleaseError(f"{final} already exists; releases are immutable")
        os.rename(staging, final)
        fsync_dir(self.root)
        return self.get(version)

    def activate(self, version: str, *, by: str, expected_active: str | None | object = ...) -> str | None:
        """Point ``ACTIVE`` at ``version`` (one atomic rename); returns the previous
        version. With ``expected_active``, refuse (``ActiveChanged``) if another
        activation happened since (a rollback while a delta was being built)."""
        release = self.get(version)
        with self._lock():
            previous = self.active_version()
            if expected_active is not ... and previous != expected_active:
                raise ActiveChanged(f"active release is {previous}, not {expected_active}; not activating {version}")
            if not release.path.is_dir():
                raise ReleaseNotFound(f"no release {version} in {self.root}")
            atomic_write_text(self.root / POINTER, version + "\n")
            entry = {
                "version": version,
                "kind": release.kind,
                "model_version": release.model_version,
                "at": time.time(),
                "by": by,
                "previous": previous,
            }
            with open(self.root / ACTIVATIONS, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        return previous

    def retain(self, keep: int) -> list[str]:
        """Remove releases beyond the newest ``keep``, never the active chain
        nor a release a kept one needs. Returns the versions removed."""
        with self._lock():
            versions = self.versions()
            kept = set(versions[-keep:])
            active = self.active_version()
            if active is not None:
                kept.add(active)
            for version in list(kept):
                try:
                    kept.update(r.version for r in self.chain(version))
                except ReleaseError:
                    pass  # a broken chain cannot be served anyway; keep what is there
            removed = [v for v in versions if v not in kept]
            for version in removed:
                self._remove(version)
        return removed

    def clean_incomplete(self) -> list[str]:
        """Remove staging directories and sealed releases that were never
        activated (a publisher killed between seal and activate). Only a
        publisher holding ``publisher_lock`` may call this."""
        removed = []
        with self._lock():
            if not self.root.is_dir():
                return removed
            for path in self.root.iterdir():
                if path.name.startswith((".staging-", ".deleting-")) and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
            activated = {entry["version"] for entry in self.activations()}
            active = self.active_version()
            for version in self.versions():
                if version not in activated and version != active:
                    self._remove(version)
                    removed.append(version)
        return removed

    def discard(self, version: str) -> None:
        """Remove a sealed release that was never activated (a lost race)."""
        with self._lock():
            if version == self.active_version() or version in {e["version"] for e in self.activations()}:
                raise ReleaseError(f"release {version} has been active; only retention removes it")
            self._remove(version)

    def _remove(self, version: str) -> None:
        # Rename first: a half-deleted release never shows under its version.
        path = self.path_of(version)
        doomed = self.root / f".deleting-{version}-{os.getpid()}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    # --- locks ------------------------------------------------------------------

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def publisher_lock(self) -> Iterator[None]:
        """Held by the running publisher; a second one refuses to start."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".publisher.lock"
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    raise ReleaseError(f"another publisher holds {path}") from error
                raise
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
