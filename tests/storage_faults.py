"""Bad storage for real: a size-limited tmpfs that a test fills up, frees,
remounts read-only and writable again. Mounting needs root (or
CAP_SYS_ADMIN); elsewhere the tests that use it are skipped, saying so."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest


def tree_bytes(path: Path) -> int:
    """Bytes in the files below ``path``: what a copy of it needs."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class SmallDisk:
    """A tmpfs of ``size_bytes`` mounted at ``path``."""

    def __init__(self, path: Path, size_bytes: int):
        self.path = Path(path)
        self.size_bytes = size_bytes
        self.filler = self.path / "filler"
        self.mounted = False

    def mount(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes}", "tmpfs", str(self.path)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {result.stderr.strip()}")
        self.mounted = True
        return self

    def fill(self) -> int:
        """Write a filler file until the file system refuses; its size."""
        written = 0
        with open(self.filler, "ab", buffering=0) as handle:
            block = b"\0" * 65536
            while True:
                try:
                    n = handle.write(block if len(block) else b"\0")
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    if len(block) == 1:
                        break
                    block = block[: len(block) // 2]
                    continue
                written += n
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def _remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True, capture_output=True)

    def read_only(self) -> None:
        self._remount("ro")

    def writable(self) -> None:
        self._remount("rw")

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self.mounted = False


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size_bytes)`` -> a mounted ``SmallDisk``, unmounted after the test."""
    disks: list[SmallDisk] = []

    def make(size_bytes: int, name: str = "disk") -> SmallDisk:
        disk = SmallDisk(tmp_path / name, size_bytes).mount()
        disks.append(disk)
        return disk

    yield make
    for disk in disks:
        disk.unmount()
