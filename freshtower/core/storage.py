"""Storage primitives every stage uses: one atomic write, one checksum.

An atomic write goes to a temporary name beside the target, is fsynced,
renamed over the target and the directory fsynced, so a reader sees the
old content or the new, never a mix, and a crash leaves one of the two.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file already written (e.g. by torch.save or numpy) to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync and rename into place, so readers see all or nothing.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "LATEST"
    >>> atomic_write_bytes(target, b"2026-11-21.1")
    >>> target.read_bytes()
    b'2026-11-21.1'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``.

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
