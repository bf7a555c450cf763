"""Where releases live: a local directory or any S3-compatible bucket.

``publisher.release_store`` names it: ``file:///ABS/PATH`` or
``s3://BUCKET[/PREFIX]`` (unset: ``<data_dir>/releases``). Both are a
``StoreBackend`` under the same ``ReleaseStore``, so the publisher writes
and every recall replica reads through one interface:

- ``LocalStore`` (``freshtower.core.versioned_store.LocalDirectory``): a
  release is staged in a directory, fsynced, its manifest written last, the
  directory renamed into place; the pointer is one atomic rename.
- ``S3Store`` (boto3): there is no rename, so a release is **published
  first, pointed at last**: every file is uploaded under
  ``<prefix>/<version>/``, then the manifest object (SHA-256 and size of
  every file) is put, only if none exists (``If-None-Match: *``); a version
  without its manifest object does not exist for readers. Then the publisher
  puts the ``ACTIVE`` object. A reader that sees ``ACTIVE`` therefore finds
  every object of the release it names. Readers download a release into
  ``publisher.release_cache_dir`` once (versions are immutable) and check
  every file against the manifest before serving it.

Keys are built only from names that passed ``check_key`` (a release
version, a file name of one plain component); a key read back from a
listing goes through the same check before it names a local path.

Locks on S3 are lease objects created with ``If-None-Match: *``: the
pointer lock is held for one pointer move; the publisher's lock is renewed
by a thread while the publisher runs, and a lease not renewed for
``LEASE_SECONDS`` (a publisher that was killed) may be taken over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from freshtower.publisher.releases import ReleaseError, ReleaseStore

from freshtower.core.settings import Settings
from freshtower.core.versioned_store import LocalDirectory as LocalStore
from freshtower.core.versioned_store import StoreBackend

__all__ = ["LocalStore", "S3Store", "StoreLocation", "open_backend", "open_release_store", "parse_store_url", "check_key"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LEASE_SECONDS = 60.0
LOCK_WAIT_SECONDS = 30.0


class StoreConfigError(ValueError):
    """A release-store URL or setting that cannot be used."""


@dataclass(frozen=True)
class StoreLocation:
    """A parsed ``publisher.release_store``."""

    scheme: str  # "file" or "s3"
    path: Path | None = None  # file
    bucket: str = ""  # s3
    prefix: str = ""  # s3, "" or "a/b/" (always ending in "/")


def parse_store_url(url: str) -> StoreLocation:
    """``file:///ABS/PATH`` or ``s3://BUCKET[/PREFIX]``.

    >>> parse_store_url("s3://releases/prod/eu")
    StoreLocation(scheme='s3', path=None, bucket='releases', prefix='prod/eu/')
    >>> parse_store_url("file:///srv/releases").path
    PosixPath('/srv/releases')
    >>> parse_store_url("s3://bucket/../x")
    Traceback (most recent call last):
    ...
    freshtower.publisher.release_store.StoreConfigError: publisher.release_store 's3://bucket/../x': prefix part '..' is not a plain name
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise StoreConfigError(f"publisher.release_store {url!r}: a file URL needs an absolute path (file:///srv/releases)")
        return StoreLocation("file", path=Path(parsed.path))
    if parsed.scheme == "s3":
        bucket = parsed.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise StoreConfigError(f"publisher.release_store {url!r}: {bucket!r} is not an S3 bucket name")
        parts = [p for p in parsed.path.split("/") if p]
        for part in parts:
            if not _NAME.fullmatch(part) or part.startswith("."):
                raise StoreConfigError(f"publisher.release_store {url!r}: prefix part {part!r} is not a plain name")
        return StoreLocation("s3", bucket=bucket, prefix="".join(p + "/" for p in parts))
    raise StoreConfigError(f"publisher.release_store {url!r}: expected file:///PATH or s3://BUCKET[/PREFIX]")


def check_key(key: str) -> str:
    """A store key: ``NAME`` or ``<version>/NAME``, each part one plain name.

    >>> check_key("00000001-full/index.faiss")
    '00000001-full/index.faiss'
    >>> check_key("00000001-full/../ACTIVE")
    Traceback (most recent call last):
    ...
    ValueError: '00000001-full/../ACTIVE' is not a store key (NAME or <version>/NAME, plain names)
    """
    parts = key.split("/")
    if not 1 <= len(parts) <= 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise ValueError(f"{key!r} is not a store key (NAME or <version>/NAME, plain names)")
    return key


def open_release_store(settings: Settings) -> ReleaseStore:
    """The release store ``settings`` name (publisher and every replica)."""
    return ReleaseStore(open_backend(settings, ReleaseError))


def open_backend(settings: Settings, error: type[Exception]) -> StoreBackend:
    """The backend ``settings.publisher.release_store`` names."""
    config = settings.publisher
    if config.release_store is None:
        return LocalStore(settings.releases_dir, error)
    location = parse_store_url(config.release_store)
    if location.scheme == "file":
        return LocalStore(location.path, error)
    return S3Store(
        location.bucket,
        location.prefix,
        cache_dir=config.release_cache_dir or settings.data_dir / "release-cache",
        endpoint_url=config.s3_endpoint_url,
        region=config.s3_region,
        access_key_id=config.s3_access_key_id,
        secret_access_key=config.s3_secret_access_key,
        error=error,
    )


class S3Store:
    """``StoreBackend`` on an S3-compatible bucket (see the module docstring)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        cache_dir: Path,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        error: type[Exception] = RuntimeError,
    ):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        self.location = f"s3://{bucket}/{prefix}".rstrip("/")
        self.cache_dir = Path(cache_dir) / re.sub(r"[^A-Za-z0-9._-]", "_", f"{bucket}/{prefix}")
        self.error = error
        credentials = {}
        if access_key_id is not None:
            credentials = {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key}
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30),
            **credentials,
        )
        self._errors = self.client.exceptions

    # --- keys ------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _internal(self, name: str) -> str:
        return f"{self.prefix}.{name}"  # locks: never a store key (those never start with '.')

    def _code(self, error: Exception) -> str:
        return getattr(error, "response", {}).get("Error", {}).get("Code", "")

    def _list(self, prefix: str) -> Iterator[dict]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    # --- reading ---------------------------------------------------------------

    def versions_with(self, manifest: str) -> list[str]:
        found = []
        for item in self._list(self.prefix):
            parts = item["Key"][len(self.prefix) :].split("/")
            if len(parts) == 2 and parts[1] == manifest and _NAME.fullmatch(parts[0]):
                found.append(parts[0])
        return found

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as error:
            if self._code(error) in ("NoSuchKey", "404"):
                return None
            raise self.error(f"{self.location}/{key}: {error}") from error

    def files(self, version: str) -> list[str]:
        base = self._key(version) + "/"
        return sorted(item["Key"][len(base) :] for item in self._list(base))

    def local_path(self, version: str) -> Path:
        """Download ``version`` once into the cache (files checked by the caller)."""
        check_key(version)
        final = self.cache_dir / version
        if (final / ".complete").is_file():
            return final
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".download-{version}-", dir=self.cache_dir))
        try:
            for name in self.files(version):
                check_key(name)  # one plain name: it cannot leave the directory
                self.client.download_file(self.bucket, self._key(f"{version}/{name}"), str(partial / name))
            (partial / ".complete").write_text("")
            try:
                os.rename(partial, final)
            except OSError:  # another reader finished first, or a stale copy without its marker
                if not (final / ".complete").is_file():
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return final

    def forget(self, version: str) -> None:
        """Drop the cached copy of ``version`` (after it failed its checks)."""
        shutil.rmtree(self.cache_dir / check_key(version), ignore_errors=True)

    # --- writing ---------------------------------------------------------------

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)  # S3 puts are atomic

    def append(self, key: str, line: bytes) -> None:
        """Read, add, put: only called under ``lock`` (pointer moves)."""
        current = self.read(key) or b""
        self.write(key, current + line.rstrip(b"\n") + b"\n")

    def stage(self, version: str) -> Path:
        check_key(version)
        staging = self.cache_dir / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{version}-", dir=staging))

    def seal(self, staging: Path, version: str, manifest: str, manifest_bytes: bytes) -> None:
        from botocore.exceptions import ClientError

        if self.read(f"{version}/{manifest}") is not None:
            raise self.error(f"{self.location}/{version} already exists; versions are immutable")
        for path in sorted(staging.iterdir()):
            self.client.upload_file(str(path), self.bucket, self._key(f"{version}/{check_key(path.name)}"))
        try:  # the manifest last, and only once: a racing writer loses here
            self.client.put_object(Bucket=self.bucket, Key=self._key(f"{version}/{manifest}"), Body=manifest_bytes, IfNoneMatch="*")
        except ClientError as error:
            if self._code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise self.error(f"{self.location}/{version} already exists; versions are immutable") from error
            raise
        shutil.rmtree(staging, ignore_errors=True)

    def remove(self, version: str) -> None:
        """The manifest first (readers stop seeing the version), then the rest."""
        base = self._key(version) + "/"
        keys = sorted((item["Key"] for item in self._list(base)), key=lambda k: not k.endswith("/manifest.json"))
        for key in keys:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        shutil.rmtree(self.cache_dir / version, ignore_errors=True)

    def clean_staging(self) -> list[str]:
        """Local staging left by a killed writer, and uploads that never got their manifest."""
        removed = []
        staging = self.cache_dir / ".staging"
        if staging.is_dir():
            for path in staging.iterdir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        sealed = set(self.versions_with("manifest.json"))
        orphans: dict[str, list[str]] = {}
        for item in self._list(self.prefix):
            parts = item["Key"][len(self.prefix) :].split("/")
            if len(parts) == 2 and _NAME.fullmatch(parts[0]) and parts[0] not in sealed:
                orphans.setdefault(parts[0], []).append(item["Key"])
        for version, keys in sorted(orphans.items()):
            for key in keys:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            removed.append(version)
        return sorted(removed)

    # --- locks -----------------------------------------------------------------

    def _take(self, key: str, owner: str) -> bool:
        """Create the lease object unless a live one exists; True if taken."""
        from botocore.exceptions import ClientError

        body = json.dumps({"owner": owner, "expires": time.time() + LEASE_SECONDS}).encode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
            return True
        except ClientError as error:
            if self._code(error) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise
        try:
            held = json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            expired = float(held["expires"]) < time.time()
        except (ClientError, ValueError, KeyError, TypeError):
            expired = True  # gone meanwhile, or unreadable: try again
        if expired:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        return False

    def _release(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    @contextmanager
    def lock(self) -> Iterator[None]:
        key, owner = self._internal("lock"), uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not self._take(key, owner):
            if time.monotonic() > deadline:
                raise self.error(f"{self.location}: the lock object {key} stayed held for {LOCK_WAIT_SECONDS:.0f} s")
            time.sleep(0.05)
        try:
            yield
        finally:
            self._release(key)

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        check_key(name)
        key, owner = self._internal(f"{name}.lock"), uuid.uuid4().hex
        if not self._take(key, owner) and not self._take(key, owner):  # a second try after an expired lease was removed
            raise self.error(f"another {name} holds s3://{self.bucket}/{key}")
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(LEASE_SECONDS / 4):
                body = json.dumps({"owner": owner, "expires": time.time() + LEASE_SECONDS}).encode()
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
                except Exception:  # the next renewal retries; the lease outlives a few failures
                    continue

        renewer = threading.Thread(target=renew, name=f"{name}-lease", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(5)
            self._release(key)
