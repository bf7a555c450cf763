"""One versioned store: immutable versions, each sealed by its manifest,
one pointer naming the current version, an optional log of pointer moves,
and retention. Full models (``LATEST``) and releases (``ACTIVE``) both keep
their versions in one; their naming and rules sit on top.

- A version is its files plus a manifest listing them (SHA-256 and size,
  ``FileDigest``), written last: a version without its manifest does not
  exist for readers. Once sealed, its files never change; *notes* about a
  version (e.g. that the publisher refused a model) may be added beside
  them and are not part of what was sealed.
- The pointer is one small object replaced in one step; with ``expected``
  it is a compare-and-swap.
- Retention removes versions beyond the newest ``keep``, never the one the
  pointer names nor any version a kept one needs.

The I/O goes through a ``StoreBackend``; ``LocalDirectory`` is the embedded
one::

    <root>/<version>/                    its files and manifest, renamed into place
    <root>/.staging-<version>-<pid>/     being written (``clean_staging`` removes it)
    <root>/.deleting-<version>-<pid>/    being removed (renamed first: a half-removed
                                         version never shows under its name)
    <root>/<pointer>                     one line, replaced atomically
    <root>/<name>.json, <log>.jsonl      notes and the pointer log
    <root>/.lock                         flock held briefly for pointer moves and retention

An object store (S3 and compatibles) fits the same interface: there is no
rename, so ``seal`` uploads the staged files under the version's prefix and
puts the manifest object last (listing counts only versions whose manifest
object exists); the pointer is one object put, made conditional on the
previous one (``If-Match``) where the store supports it; a note is an
object; the log one object per entry.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ContextManager, Protocol

from freshtower.core.storage import (
    FileDigest,
    atomic_write_bytes,
    digest_mismatch,
    file_digest,
    fsync_dir,
    fsync_file,
    write_file,
    writing,
)

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"


class StoreError(RuntimeError):
    """A version or pointer that is missing, incomplete, corrupt or does not fit."""


class PointerMoved(StoreError):
    """The pointer did not name the version a compare-and-swap expected."""


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()  # ``set_pointer(expected=ANY)``: move the pointer whatever it names now


class StoreBackend(Protocol):
    """The I/O a versioned store needs. Keys are ``NAME`` (the store's root)
    or ``<version>/NAME``."""

    location: str  # a path or URL, for messages

    def versions_with(self, manifest: str) -> list[str]:
        """Names of the versions whose manifest object exists (any order)."""
        ...

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Replace the object in one step (readers see the old or the new)."""
        ...

    def append(self, key: str, line: bytes) -> None:
        """Add one durable line (a log entry) to the object."""
        ...

    def stage(self, version: str) -> Path:
        """A fresh, empty local directory for the files of ``version``."""
        ...

    def seal(self, staging: Path, version: str, manifest: str, manifest_bytes: bytes) -> None:
        """Make the staged files ``version``, the manifest last; refuse if
        ``version`` exists (versions are immutable)."""
        ...

    def local_path(self, version: str) -> Path:
        """A local directory where a sealed version's files can be read."""
        ...

    def files(self, version: str) -> list[str]:
        """Names of the objects under ``version``."""
        ...

    def remove(self, version: str) -> None: ...

    def clean_staging(self) -> list[str]:
        """Remove what interrupted writers and removals left; their names."""
        ...

    def lock(self) -> ContextManager[None]:
        """An exclusive lock for pointer moves and retention, held briefly."""
        ...

    def exclusive(self, name: str) -> ContextManager[None]:
        """Held by the one writer process of ``name`` for as long as it runs;
        raises if another holds it."""
        ...


class LocalDirectory:
    """``StoreBackend`` on a local directory (see the module docstring)."""

    def __init__(self, root: Path, error: type[Exception] = StoreError):
        self.root = Path(root)
        self.location = str(self.root)
        self.error = error

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not 1 <= len(parts) <= 2 or any(not p or p.startswith(".") or p == ".." for p in parts):
            raise ValueError(f"{key!r} is not a store key (NAME or <version>/NAME)")
        return self.root.joinpath(*parts)

    def versions_with(self, manifest: str) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / manifest).is_file()]

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)

    def append(self, key: str, line: bytes) -> None:
        path = self._path(key)
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab+") as handle:
                handle.seek(0, os.SEEK_END)
                torn = handle.tell() > 0 and (handle.seek(-1, os.SEEK_END) or handle.read(1) != b"\n")
                # A line torn by a full disk stays a line of its own (skipped by readers), never glued to this one.
                handle.write((b"\n" if torn else b"") + line.rstrip(b"\n") + b"\n")
                handle.flush()
                os.fsync(handle.fileno())

    def stage(self, version: str) -> Path:
        self._path(version)  # a plain name
        path = self.root / f"{STAGING_PREFIX}{version}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        with writing(path):
            path.mkdir(parents=True)
        return path

    def seal(self, staging: Path, version: str, manifest: str, manifest_bytes: bytes) -> None:
        write_file(staging / manifest, lambda handle: handle.write(manifest_bytes))  # renamed into place below: no second copy
        final = self._path(version)
        with writing(final):
            fsync_dir(staging)
            if final.exists():
                raise self.error(f"{final} already exists; versions are immutable")
            os.rename(staging, final)
            fsync_dir(self.root)

    def local_path(self, version: str) -> Path:
        return self._path(version)

    def files(self, version: str) -> list[str]:
        path = self._path(version)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def remove(self, version: str) -> None:
        doomed = self.root / f"{DELETING_PREFIX}{version}-{os.getpid()}"
        os.rename(self._path(version), doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def clean_staging(self) -> list[str]:
        if not self.root.is_dir():
            return []
        removed = []
        for path in self.root.iterdir():
            if path.name.startswith((STAGING_PREFIX, DELETING_PREFIX)) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return sorted(removed)

    @contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".{name}.lock"
        with writing(path):  # a read-only store: the part stops here, naming the file
            handle = open(path, "a")
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    raise self.error(f"another {name} holds {path}") from error
                raise
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class VersionedStore:
    """Versions sealed by their manifest, one pointer, retention.

    ``version_key`` orders version names and rejects what is not one
    (None); ``check_version`` returns a name or raises ``ValueError`` with
    what a version should look like; ``notes`` are the file names that may
    be added to a sealed version; ``pointer_log``, if given, is the log
    every pointer move is appended to.
    """

    def __init__(
        self,
        location: Path | StoreBackend,
        *,
        pointer: str,
        version_key: Callable[[str], Any],
        check_version: Callable[[str], str],
        error: type[Exception] = StoreError,
        manifest: str = MANIFEST,
        notes: Iterable[str] = (),
        pointer_log: str | None = None,
    ):
        self.backend: StoreBackend = LocalDirectory(location, error) if isinstance(location, (str, Path)) else location
        self.pointer_name = pointer
        self.version_key = version_key
        self.check_version = check_version
        self.error = error
        self.manifest_name = manifest
        self.notes = frozenset(notes)
        self.pointer_log = pointer_log

    @property
    def location(self) -> str:
        return self.backend.location

    # --- reading -----------------------------------------------------------------

    def versions(self) -> list[str]:
        """Sealed versions, oldest first (staging is never listed)."""
        found = [v for v in self.backend.versions_with(self.manifest_name) if self.version_key(v) is not None]
        return sorted(found, key=self.version_key)

    def manifest_bytes(self, version: str) -> bytes | None:
        """The sealed manifest of ``version``, or None if there is no such version."""
        return self.backend.read(f"{self.check_version(version)}/{self.manifest_name}")

    def manifest_location(self, version: str) -> str:
        return f"{self.location}/{version}/{self.manifest_name}"

    def path_of(self, version: str) -> Path:
        """Where the files of ``version`` can be read."""
        return self.backend.local_path(self.check_version(version))

    def verify(self, version: str, files: dict[str, FileDigest], *, where: str) -> None:
        """Every listed file is there with its size and SHA-256, and nothing
        else is (notes aside); raises naming ``where`` and the file."""
        directory = self.path_of(version)
        present = set(self.backend.files(version)) - {self.manifest_name} - self.notes
        if extra := sorted(present - set(files)):
            raise self.error(f"{where}: files not in the manifest: {extra}")
        for name, expected in files.items():
            if problem := digest_mismatch(directory / name, expected):
                raise self.error(f"{where}: {problem}")

    def pointer(self) -> str | None:
        """The version the pointer names, or None before the first move."""
        raw = self.backend.read(self.pointer_name)
        if raw is None:
            return None
        text = raw.decode(errors="replace").strip()
        try:
            return self.check_version(text)
        except ValueError as error:
            raise self.error(f"{self.location}/{self.pointer_name}: {error}") from error

    def read_note(self, name: str, version: str | None = None) -> dict | None:
        """A small JSON note at the root (or about ``version``), or None."""
        key = self._note_key(name, version)
        raw = self.backend.read(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as error:
            raise self.error(f"{self.location}/{key}: unreadable: {error}") from error

    def read_log(self) -> list[dict]:
        """Every pointer move, oldest first (a torn last line from a crash is skipped)."""
        raw = self.backend.read(self.pointer_log) if self.pointer_log else None
        entries = []
        for line in (raw or b"").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    # --- writing -----------------------------------------------------------------

    @contextmanager
    def staging(self, version: str) -> Iterator[Path]:
        """A local directory to write the files of ``version`` into before
        ``seal``; removed if the block raises."""
        path = self.stage(version)
        try:
            yield path
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise

    def stage(self, version: str) -> Path:
        return self.backend.stage(self.check_version(version))

    def seal(self, staging: Path, version: str, manifest_for: Callable[[dict[str, FileDigest]], bytes]) -> None:
        """Fsync and checksum every staged file, then write the manifest that
        ``manifest_for(files)`` returns, last, and make the version visible."""
        self.check_version(version)
        files = {}
        for path in sorted(staging.iterdir()):
            if path.name == self.manifest_name or not path.is_file():
                raise self.error(f"{path}: unexpected entry in a staging directory")
            fsync_file(path)
            files[path.name] = file_digest(path)
        self.backend.seal(staging, version, self.manifest_name, manifest_for(files))

    def set_pointer(self, version: str, *, expected: str | None = ANY, entry: dict | None = None) -> str | None:
        """Point at ``version`` (which must be sealed); returns the version
        pointed at before. With ``expected``, a compare-and-swap: raises
        ``PointerMoved`` if the pointer names another version. ``entry`` goes
        into the pointer log, with ``version`` and ``previous`` added."""
        with self.backend.lock():
            previous = self.pointer()
            if expected is not ANY and previous != expected:
                raise PointerMoved(f"{self.pointer_name} names {previous}, not {expected}; not moving it to {version}")
            if self.manifest_bytes(version) is None:
                raise self.error(f"no version {version} in {self.location}")
            self.backend.write(self.pointer_name, (version + "\n").encode())
            if self.pointer_log is not None:
                record = {"version": version, **(entry or {}), "previous": previous}
                self.backend.append(self.pointer_log, json.dumps(record).encode())
        return previous

    def write_note(self, name: str, note: dict, version: str | None = None) -> None:
        """Replace a small JSON note at the root, or one of the ``notes`` about ``version``."""
        self.backend.write(self._note_key(name, version), json.dumps(note, sort_keys=True).encode())

    def _note_key(self, name: str, version: str | None) -> str:
        if version is not None:
            if name not in self.notes:
                raise ValueError(f"{name!r} is not a note a sealed version may carry ({sorted(self.notes)})")
            return f"{self.check_version(version)}/{name}"
        if name in (self.pointer_name, self.pointer_log) or "/" in name or name.startswith(".") or self.version_key(name) is not None:
            raise ValueError(f"{name!r} is not a note name")
        return name

    # --- removing ----------------------------------------------------------------

    def remove(self, version: str) -> None:
        """Remove a sealed version (rename first, then delete)."""
        self.backend.remove(self.check_version(version))

    def retain(self, keep: int, *, needs: Callable[[str], Iterable[str]] = lambda v: (), protect: Iterable[str] = ()) -> list[str]:
        """Remove versions beyond the newest ``keep``, never the one the
        pointer names, nor those in ``protect``, nor any version ``needs``
        says a kept one needs. Returns the versions removed, oldest first."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        with self.backend.lock():
            versions = self.versions()
            kept = set(versions[-keep:]) | set(protect)
            if (current := self.pointer()) is not None:
                kept.add(current)
            for version in list(kept):
                kept.update(needs(version))
            removed = [v for v in versions if v not in kept]
            for version in removed:
                self.backend.remove(version)
        return removed

    def clean_staging(self) -> list[str]:
        """Remove what interrupted writers left. Only the store's one writer may call this."""
        with self.backend.lock():
            return self.backend.clean_staging()

    def lock(self) -> ContextManager[None]:
        return self.backend.lock()

    def exclusive(self, name: str) -> ContextManager[None]:
        return self.backend.exclusive(name)
