"""The storage primitives on a real full disk and a read-only file system
(a size-limited tmpfs): the error names the file meant, the old content
stays, nothing partial is left, and the write succeeds once space returns."""

from __future__ import annotations

import pytest

from freshtower.core.storage import StorageError, atomic_write_bytes, write_file
from freshtower.core.versioned_store import LocalDirectory


def test_a_full_disk_names_the_file_keeps_the_old_content_and_leaves_nothing_partial(small_disk):
    disk = small_disk(1 << 20)
    target = disk.path / "batches" / "LATEST"
    target.parent.mkdir()
    atomic_write_bytes(target, b"old")
    disk.fill()
    with pytest.raises(StorageError) as caught:
        atomic_write_bytes(target, b"new" * 100_000)
    assert str(target) in str(caught.value) and "No space left on device" in str(caught.value), str(caught.value)
    assert "free space there" in str(caught.value)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["LATEST"]  # no temporary file left behind
    staged = disk.path / "staged.npy"
    with pytest.raises(StorageError, match=str(staged)):
        write_file(staged, lambda handle: handle.write(b"x" * 200_000))
    assert not staged.exists()  # the partial file is removed: its space comes back
    disk.free()
    atomic_write_bytes(target, b"new" * 100_000)
    assert target.read_bytes() == b"new" * 100_000


def test_a_read_only_file_system_names_the_file_not_a_temporary_name(small_disk):
    disk = small_disk(1 << 20)
    target = disk.path / "ACTIVE"
    atomic_write_bytes(target, b"00000001-full\n")
    disk.read_only()
    with pytest.raises(StorageError) as caught:
        atomic_write_bytes(target, b"00000002-full\n")
    message = str(caught.value)
    assert message.startswith(f"cannot write {target}: Read-only file system"), message
    assert ".tmp-" not in message
    disk.writable()
    atomic_write_bytes(target, b"00000002-full\n")
    assert target.read_bytes() == b"00000002-full\n"


def test_a_log_line_torn_by_a_full_disk_is_never_glued_to_the_next(small_disk):
    disk = small_disk(1 << 20)
    store = LocalDirectory(disk.path / "releases")
    store.append("activations.jsonl", b'{"version": "00000001-full"}')
    log = store.root / "activations.jsonl"
    with open(log, "ab") as handle:
        handle.write(b'{"version": "000000')  # what a write cut short by ENOSPC leaves
    disk.fill()
    with pytest.raises(StorageError, match="activations.jsonl"):
        store.append("activations.jsonl", b'{"version": "00000002-full"}' + b" " * 100_000)
    disk.free()
    store.append("activations.jsonl", b'{"version": "00000002-full"}')
    lines = log.read_bytes().splitlines()
    assert lines[0] == b'{"version": "00000001-full"}' and lines[-1] == b'{"version": "00000002-full"}'
