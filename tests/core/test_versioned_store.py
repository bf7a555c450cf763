"""The versioned store's rules, checked once over both of its users: the
full models (``<day>.<n>`` behind ``LATEST``) and the releases
(``<8 digits>-<kind>`` behind ``ACTIVE``, with an activation log)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from freshtower.core.storage import FileDigest
from freshtower.core.versioned_store import PointerMoved, VersionedStore


@dataclass
class User:
    name: str
    store: VersionedStore
    versions: list[str]  # five version names, oldest first
    error: type[Exception]


def full_models(root: Path) -> User:
    from freshtower.trainer.artifacts import ArtifactError, full_model_store

    # 2026-11-21.10 sorts after .9: attempts are numbers, not text
    names = ["2026-11-20.1", "2026-11-21.9", "2026-11-21.10", "2026-11-22.1", "2026-11-23.1"]
    return User("full models", full_model_store(root), names, ArtifactError)


def releases(root: Path) -> User:
    from freshtower.publisher.releases import ReleaseError, ReleaseStore

    names = ["00000001-full", "00000002-embeddings", "00000003-embeddings", "00000004-full", "00000005-embeddings"]
    return User("releases", ReleaseStore(root).versioned, names, ReleaseError)


@pytest.fixture(params=[full_models, releases], ids=["full-models", "releases"])
def user(request, tmp_path) -> User:
    return request.param(tmp_path / "store")


def seal(store: VersionedStore, version: str, payload: bytes = b"weights") -> dict[str, FileDigest]:
    """Seal ``version`` with one file; the manifest records what the store listed."""
    seen = {}

    def manifest(files: dict[str, FileDigest]) -> bytes:
        seen.update(files)
        return json.dumps({"version": version, "files": {k: vars(v) for k, v in files.items()}}).encode()

    with store.staging(version) as staging:
        (staging / "part.bin").write_bytes(payload)
        store.seal(staging, version, manifest)
    return seen


def test_a_version_exists_once_its_manifest_is_sealed_and_never_changes(user):
    store = user.store
    first = user.versions[0]
    staging = store.stage(first)
    (staging / "part.bin").write_bytes(b"half")
    assert store.versions() == [] and store.manifest_bytes(first) is None  # staged: invisible
    files = {}
    store.seal(staging, first, lambda listed: files.update(listed) or b"{}")
    # sha256(b"half") worked out with hashlib
    assert files == {"part.bin": FileDigest(sha256="a11ae06469c63740d7b0ecf802f282a0d46e94f31a654dfcd3c0dc6dc277f904", bytes=4)}
    assert store.versions() == [first] and store.manifest_bytes(first) == b"{}"
    with pytest.raises(user.error, match="immutable"):
        seal(store, first, b"other")
    assert (store.path_of(first) / "part.bin").read_bytes() == b"half"
    assert not any(p.name.startswith(".staging-") for p in Path(store.location).iterdir())


def test_versions_are_listed_in_their_order_and_other_names_are_not_versions(user):
    store = user.store
    for version in reversed(user.versions):
        seal(store, version)
    (Path(store.location) / "not-a-version").mkdir()
    (Path(store.location) / "not-a-version" / "manifest.json").write_text("{}")
    assert store.versions() == user.versions
    with pytest.raises(ValueError):
        store.stage("../escape")


def test_a_failed_staging_block_leaves_nothing(user):
    with pytest.raises(RuntimeError, match="disk full"), user.store.staging(user.versions[0]) as staging:
        (staging / "part.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert list(Path(user.store.location).iterdir()) == []


def test_the_pointer_moves_in_one_step_and_compares_and_swaps(user):
    store = user.store
    a, b, c = user.versions[:3]
    for version in (a, b, c):
        seal(store, version)
    assert store.pointer() is None
    assert store.set_pointer(a) is None
    assert store.set_pointer(b, expected=a) == a
    with pytest.raises(PointerMoved, match=f"names {b}, not {a}"):
        store.set_pointer(c, expected=a)
    assert store.pointer() == b
    with pytest.raises(user.error, match=f"no version {user.versions[4]}"):
        store.set_pointer(user.versions[4])  # never sealed
    assert store.pointer() == b
    pointer = Path(store.location) / store.pointer_name
    assert pointer.read_text() == f"{b}\n"
    pointer.write_text("../../etc\n")
    with pytest.raises(user.error, match=r"'../../etc' is not a (model|release) version"):
        store.pointer()


def test_retention_keeps_the_newest_the_pointed_the_protected_and_what_they_need(user):
    store = user.store
    v1, v2, v3, v4, v5 = user.versions
    for version in user.versions:
        seal(store, version)
    store.set_pointer(v2)
    # newest two: v4, v5; the pointer: v2; v5 needs v4 and v3 (a chain); v1 is none of these
    removed = store.retain(2, needs=lambda v: [v3, v4] if v == v5 else [])
    assert removed == [v1] and store.versions() == [v2, v3, v4, v5]
    assert store.retain(1, protect=[v3]) == [v4]  # v5 newest, v2 pointed, v3 protected
    assert store.versions() == [v2, v3, v5]
    with pytest.raises(ValueError):
        store.retain(0)


def test_verify_catches_a_changed_file_and_an_extra_one_but_not_a_note(user):
    store = user.store
    version = user.versions[0]
    files = seal(store, version, b"0123456789")
    store.verify(version, files, where=f"{user.name} {version}")
    path = store.path_of(version) / "part.bin"
    path.write_bytes(b"0123456788")  # same size, one byte differs
    with pytest.raises(user.error, match=f"^{user.name} {version}: .*part.bin SHA-256 .* does not match"):
        store.verify(version, files, where=f"{user.name} {version}")
    path.write_bytes(b"0123456789")
    if store.notes:  # full models: the publisher's refusal note sits beside the sealed files
        store.write_note(next(iter(store.notes)), {"reason": "recall dropped"}, version=version)
        store.verify(version, files, where=version)
    with pytest.raises(ValueError, match="not a note"):
        store.write_note("extra.bin", {}, version=version)
    (store.path_of(version) / "extra.bin").write_bytes(b"x")
    with pytest.raises(user.error, match=r"files not in the manifest: \['extra.bin'\]"):
        store.verify(version, files, where=version)


def test_notes_at_the_root_are_replaced_atomically_and_cannot_shadow_the_pointer(user):
    store = user.store
    assert store.read_note("kafka.json") is None
    store.write_note("kafka.json", {"sent_through_sequence": 3})
    assert store.read_note("kafka.json") == {"sent_through_sequence": 3}
    for bad in (store.pointer_name, ".lock", "a/b", user.versions[0]):
        with pytest.raises(ValueError):
            store.write_note(bad, {})


def test_clean_staging_removes_what_an_interrupted_writer_left(user):
    store = user.store
    seal(store, user.versions[0])
    store.stage(user.versions[1])  # a writer killed mid-version
    removed = store.clean_staging()
    assert len(removed) == 1 and removed[0].startswith(f".staging-{user.versions[1]}-")
    assert store.versions() == [user.versions[0]]


def test_only_the_releases_log_their_pointer_moves(user):
    store = user.store
    a, b = user.versions[:2]
    seal(store, a)
    seal(store, b)
    store.set_pointer(a, entry={"by": "test"})
    store.set_pointer(b, entry={"by": "test"})
    if user.name == "releases":
        assert [(e["version"], e["previous"], e["by"]) for e in store.read_log()] == [(a, None, "test"), (b, a, "test")]
    else:
        assert store.read_log() == []


def test_a_full_model_is_adopted_into_another_store_sealed_and_pointed_at(tmp_path):
    from freshtower.trainer.artifacts import (
        ArtifactError,
        adopt_full_model,
        latest_full_model,
        load_full_model,
        new_estimator,
        new_model,
        retain_full_models,
        save_full_model,
    )

    from freshtower.core.contracts import TrainingRecord
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "data")
    record = TrainingRecord(
        parent=None, from_scratch=True, data_start_ms=0, data_end_ms=60_000, newest_click_event_time_ms=None,
        holdout_start_ms=60_000, holdout_end_ms=120_000, metrics={}, lineage=[], config=settings.as_record(),
    )  # fmt: skip
    source = tmp_path / "source"
    refs = [save_full_model(source, day, new_model(settings), new_estimator(settings), {}, record) for day in ("2026-11-20", "2026-11-21")]
    assert [r.version for r in refs] == ["2026-11-20.1", "2026-11-21.1"] and latest_full_model(source).version == "2026-11-21.1"

    target = tmp_path / "target"
    adopted = adopt_full_model(refs[0], target)
    assert latest_full_model(target).version == "2026-11-20.1" and adopted.manifest == refs[0].manifest
    load_full_model(adopted)  # its files match the manifest it carries

    (refs[1].path / "model.pt").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        adopt_full_model(refs[1], target)
    assert latest_full_model(target).version == "2026-11-20.1"
    assert [p.name for p in target.iterdir() if p.name.startswith(".staging-")] == []

    # retention keeps LATEST even when it is not among the newest
    save_full_model(source, "2026-11-22", new_model(settings), new_estimator(settings), {}, record)
    (source / "LATEST").write_text("2026-11-20.1\n")
    assert retain_full_models(source, keep=1) == ["2026-11-21.1"]
