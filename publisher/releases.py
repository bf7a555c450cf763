"""The release store: immutable, versioned releases behind one atomic pointer.

Embedded default: a local directory, ``settings.releases_dir``::

    ACTIVE                      the version being served (replaced atomically)
    activations.jsonl           append-only: every activation (version, wall time, by, previous)
    kafka.json                  newest release whose rows went to the user-embeddings topic
    .lock                       flock for pointer updates and retention (held briefly)
    .publisher.lock             flock held by the one running publisher
    .staging-<version>-<pid>/   a release being written: never read, removed by the next publisher
    00000001-full/              manifest.json, user_tower.pt, user_embeddings.npy, user_ids.json,
                                item_vectors.npy, item_ids.json, index.faiss
    00000002-embeddings/        manifest.json, user_embeddings.npy, user_ids.json, row_event_time_ms.npy

A version is ``<8-digit sequence>-<kind>``; the sequence orders releases.
The releases are a ``VersionedStore``: a release is written under a
staging name, every file fsynced, its manifest (``ReleaseManifest``, with
the SHA-256 and size of every file) written last, and the directory
renamed to its version: a reader never sees half a release.
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

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Literal

from freshtower.core.contracts import ContractError, ReleaseManifest, release_manifest_from_json
from freshtower.core.storage import FileDigest
from freshtower.core.versioned_store import ANY, PointerMoved, StoreBackend, StoreError, VersionedStore

MANIFEST = "manifest.json"
POINTER = "ACTIVE"
ACTIVATIONS = "activations.jsonl"
_VERSION = re.compile(r"^([0-9]{8})-(full|embeddings)$")
Kind = Literal["full", "embeddings"]


class ReleaseError(StoreError):
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


def _version_key(name: str) -> str | None:
    return name if _VERSION.fullmatch(name) else None  # 8 digits first: names sort by sequence


@dataclass(frozen=True)
class Release:
    """One sealed release: its manifest, and where its files can be read
    (``path``: on an object store, a local copy made on first use)."""

    version: str
    locate: Callable[[], Path] = dataclasses.field(repr=False, compare=False)
    manifest: ReleaseManifest

    @functools.cached_property
    def path(self) -> Path:
        return self.locate()

    @property
    def kind(self) -> Kind:
        return self.manifest.kind

    @property
    def parent(self) -> str | None:
        return self.manifest.parent

    @property
    def sequence(self) -> int:
        return int(self.version.split("-", 1)[0])

    @property
    def model_version(self) -> str:
        """The full-model artifact whose towers this release belongs to."""
        return self.manifest.model_version

    def file(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise ReleaseError(f"release {self.version}: manifest lists no file {name!r}")
        return self.path / name


class ReleaseStore:
    """Releases under one directory or bucket prefix (``location``: a path or a
    ``StoreBackend``, see ``release_store``); the module docstring has the layout."""

    def __init__(self, location: Path | StoreBackend):
        self.root: Path | str = Path(location) if isinstance(location, (str, Path)) else location.location  # for messages
        self.versioned = VersionedStore(
            location if not isinstance(location, (str, Path)) else self.root,
            pointer=POINTER,
            version_key=_version_key,
            check_version=parse_version,
            error=ReleaseError,
            manifest=MANIFEST,
            pointer_log=ACTIVATIONS,
        )

    # --- reading -------------------------------------------------------------

    def path_of(self, version: str) -> Path:
        return self.versioned.path_of(version)

    def get(self, version: str) -> Release:
        raw = self.versioned.manifest_bytes(version)
        if raw is None:
            raise ReleaseNotFound(f"no release {version} in {self.root}")
        where = self.versioned.manifest_location(version)
        try:
            manifest = release_manifest_from_json(raw, where)
        except ContractError as error:
            raise ReleaseError(str(error)) from error
        if manifest.version != version:
            raise ReleaseError(f"{where}: field 'version' is {manifest.version!r}, but the directory is {version}")
        return Release(version, lambda: self.path_of(version), manifest)

    def versions(self) -> list[str]:
        """Sealed releases, oldest first (staging directories are not listed)."""
        return self.versioned.versions()

    def list(self) -> list[Release]:
        return [self.get(v) for v in self.versions()]

    def active_version(self) -> str | None:
        return self.versioned.pointer()

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
        try:
            self.versioned.verify(version, release.manifest.files, where=f"release {version}")
        except ReleaseError:
            if forget := getattr(self.versioned.backend, "forget", None):
                forget(version)  # a local copy of a remote release: fetch it again next time
            raise
        return release

    def activations(self) -> list[dict]:
        """Every activation, oldest first (a torn last line from a crash is skipped)."""
        return self.versioned.read_log()

    def read_note(self, name: str) -> dict | None:
        """A small JSON state file at the root (e.g. ``kafka.json``), or None."""
        return self.versioned.read_note(name)

    # --- writing (the publisher) ------------------------------------------------

    def write_note(self, name: str, note: dict) -> None:
        self.versioned.write_note(name, note)

    def next_version(self, kind: Kind) -> str:
        """Only the publisher, holding ``publisher_lock``, allocates versions."""
        sequences = [int(v.split("-", 1)[0]) for v in self.versions()]
        return format_version(max(sequences, default=0) + 1, kind)

    def staging_dir(self, version: str) -> Path:
        return self.versioned.stage(version)

    def seal(self, staging: Path, manifest: ReleaseManifest) -> Release:
        """Checksum every file in ``staging``, write ``manifest`` (its
        ``files`` filled in) last, and rename the directory to its version.
        Not active yet."""
        if manifest.files:
            raise ValueError(f"release {manifest.version}: the store lists the files when it seals; got {sorted(manifest.files)}")

        def sealed(files: dict[str, FileDigest]) -> bytes:
            return dataclasses.replace(manifest, files=files).to_json()

        self.versioned.seal(staging, manifest.version, sealed)
        return self.get(manifest.version)

    def activate(self, version: str, *, by: str, expected_active: str | None | EllipsisType = ...) -> str | None:
        """Point ``ACTIVE`` at ``version`` (one atomic rename); returns the previous
        version. With ``expected_active``, refuse (``ActiveChanged``) if another
        activation happened since (a rollback while a delta was being built)."""
        release = self.get(version)
        entry = {"kind": release.kind, "model_version": release.model_version, "at": time.time(), "by": by}
        try:
            return self.versioned.set_pointer(version, expected=ANY if expected_active is ... else expected_active, entry=entry)
        except PointerMoved as error:
            raise ActiveChanged(f"active release is {self.active_version()}, not {expected_active}; not activating {version}") from error

    def retain(self, keep: int) -> list[str]:
        """Remove releases beyond the newest ``keep``, never the active chain
        nor a release a kept one needs. Returns the versions removed."""

        def needs(version: str) -> list[str]:
            try:
                return [r.version for r in self.chain(version)]
            except ReleaseError:
                return []  # a broken chain cannot be served anyway; keep what is there

        return self.versioned.retain(keep, needs=needs)

    def clean_incomplete(self) -> list[str]:
        """Remove staging directories and sealed releases that were never
        activated (a publisher killed between seal and activate). Only a
        publisher holding ``publisher_lock`` may call this."""
        removed = self.versioned.clean_staging()
        with self.versioned.lock():
            activated = {entry["version"] for entry in self.activations()}
            active = self.active_version()
            for version in self.versions():
                if version not in activated and version != active:
                    self.versioned.remove(version)
                    removed.append(version)
        return removed

    def discard(self, version: str) -> None:
        """Remove a sealed release that was never activated (a lost race)."""
        with self.versioned.lock():
            if version == self.active_version() or version in {e["version"] for e in self.activations()}:
                raise ReleaseError(f"release {version} has been active; only retention removes it")
            self.versioned.remove(version)

    def _remove(self, version: str) -> None:
        self.versioned.remove(version)

    # --- locks ------------------------------------------------------------------

    @contextmanager
    def publisher_lock(self) -> Iterator[None]:
        """Held by the running publisher; a second one refuses to start."""
        with self.versioned.exclusive("publisher"):
            yield
