"""Storage primitives every stage uses: one atomic write, one checksum.

An atomic write goes to a temporary name beside the target, is fsynced,
renamed over the target and the directory fsynced, so a reader sees the
old content or the new, never a mix, and a crash leaves one of the two.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


_HINTS = {
    errno.ENOSPC: "the file system is full; free space there, then start the part again",
    errno.EDQUOT: "the disk quota is used up; free space there, then start the part again",
    errno.EFBIG: "the file is larger than the file system or a limit allows",
    errno.EROFS: "the file system is read-only; make it writable, then start the part again",
    errno.EACCES: "the directory is not writable by this user; make it writable, then start the part again",
    errno.EPERM: "the directory is not writable by this user; make it writable, then start the part again",
}


class StorageError(OSError):
    """A write the file system refused, naming the file meant (not a
    temporary name) and what to do.

    >>> str(StorageError(Path("/data/batches/x.tfrecord"), OSError(errno.ENOSPC, "No space left on device")))
    'cannot write /data/batches/x.tfrecord: No space left on device (the file system is full; free space there, then start the part again)'
    """

    def __init__(self, path: Path, error: OSError):
        super().__init__(error.errno, error.strerror or str(error), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        hint = _HINTS.get(self.errno)
        return f"cannot write {self.path}: {self.strerror}" + (f" ({hint})" if hint else "")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Inside the block, an ``OSError`` becomes a ``StorageError`` naming ``path``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        raise StorageError(path, error) from error


def write_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(handle)`` on a new file at ``path`` and fsync it; not
    atomic by itself (for files of a staging directory that is renamed
    into place afterwards). A refused write raises ``StorageError`` naming
    ``path`` and removes the partial file, so a full disk gets its space back."""
    path = Path(path)
    try:
        with writing(path), open(path, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file already written (e.g. by torch.save or numpy) to disk."""
    with writing(path), open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, sync_directory: bool = True) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it
    and rename it over ``path``: readers see the old content or the new.

    ``sync_directory`` False leaves the directory fsync (which makes the
    rename durable) to the caller, e.g. when a second file is written into
    the same directory next and syncs it for both.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            with open(tmp, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sync_directory:
            fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, sync_directory: bool = True) -> None:
    """Write, fsync and rename into place, so readers see all or nothing.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "LATEST"
    >>> atomic_write_bytes(target, b"2026-11-21.1")
    >>> target.read_bytes()
    b'2026-11-21.1'
    """
    atomic_write(path, lambda handle: handle.write(data), sync_directory=sync_directory)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex SHA-256 of ``data`` (any bytes-like object).

    >>> sha256_bytes(b"")
    'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class FileDigest:
    """What a manifest records of each file it lists."""

    sha256: str  # hex
    bytes: int  # size


def file_digest(path: Path) -> FileDigest:
    """SHA-256 and size of a file.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "rows"
    >>> _ = path.write_bytes(b"0123456789")
    >>> file_digest(path)  # sha256(b"0123456789"), worked out with hashlib
    FileDigest(sha256='84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882', bytes=10)
    """
    return FileDigest(sha256=sha256_file(path), bytes=Path(path).stat().st_size)


def digest_mismatch(path: Path, expected: FileDigest) -> str | None:
    """Why ``path`` does not match ``expected`` (missing, size, SHA-256), or None."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected.bytes:
        return f"{path} has {size} bytes, the manifest says {expected.bytes} (so its SHA-256 cannot match either)"
    actual = sha256_file(path)
    if actual != expected.sha256:
        return f"{path} SHA-256 {actual} does not match the manifest's {expected.sha256}"
    return None
