from __future__ import annotations

import json

import pytest
from freshtower.publisher.releases import ActiveChanged, ReleaseError, ReleaseNotFound, ReleaseStore, parse_version

from freshtower.core.contracts import (
    CheckpointRead,
    Dims,
    EmbeddingsReleaseManifest,
    EventTimeRange,
    FullReleaseManifest,
    IndexSummary,
    ModelSummary,
    RecallChecks,
    ReleaseManifest,
)
from freshtower.core.storage import FileDigest


def release_manifest(version: str, kind: str, parent: str | None = None, model_version: str = "2026-11-20.1") -> ReleaseManifest:
    """A small manifest of either kind, its files to be listed when sealed."""
    common = dict(
        version=version,
        parent=parent,
        full_version=version if kind == "full" else "00000001-full",
        model_version=model_version,
        created_at=1_000.0,
        online_steps={} if kind == "full" else {"checkpoint.pt": 3},
        checkpoint_event_time_ms=60_000,
        event_time=EventTimeRange(start_ms=0, end_ms=60_000),
        newest_click_event_time_ms=59_000,
        newest_click_is_bound=False,
        rows={"user_embeddings": 2},
        dims=Dims(id_dim=4, output_dim=8),
        config={},
        files={},
    )
    if kind == "full":
        return FullReleaseManifest(
            **common,
            index=IndexSummary(kind="IndexFlatIP", settings={}, build_seconds=0.1, recall_at_100_vs_exact=1.0, check_queries=10),
            checks=RecallChecks(holdout_recall_at_50=0.3, active_holdout_recall_at_50=None, max_recall_drop=0.02),
            model=ModelSummary(version=model_version, day="2026-11-20", parent=None, created_at=900.0, metrics={}),
        )
    return EmbeddingsReleaseManifest(
        **common, checkpoints={"checkpoint.pt": CheckpointRead(step=3, since=0, rows=2, written_at=950.0)}, resync=[]
    )


def make_release(
    store: ReleaseStore, kind: str, parent: str | None = None, model_version: str = "2026-11-20.1", payload: bytes = b"rows"
) -> str:
    version = store.next_version(kind)
    staging = store.staging_dir(version)
    (staging / "user_embeddings.npy").write_bytes(payload)
    store.seal(staging, release_manifest(version, kind, parent, model_version))
    return version


@pytest.mark.parametrize(
    "bad", ["", "1-full", "00000001-FULL", "00000001-full/../x", "../00000001-full", "00000001-full\n", "00000001-delta", "0000000a-full"]
)
def test_malformed_versions_are_rejected_before_touching_a_path(tmp_path, bad):
    store = ReleaseStore(tmp_path)
    with pytest.raises(ValueError, match="not a release version"):
        parse_version(bad)
    with pytest.raises(ValueError):
        store.get(bad)


def test_a_sealed_release_is_invisible_to_serving_until_the_pointer_names_it(tmp_path):
    store = ReleaseStore(tmp_path)
    full = make_release(store, "full")
    assert store.versions() == ["00000001-full"] and store.active_version() is None
    assert store.activate(full, by="test") is None
    delta = make_release(store, "embeddings", parent=full)
    assert delta == "00000002-embeddings" and store.active_version() == full
    assert store.activate(delta, by="test") == full
    assert [r.version for r in store.chain(delta)] == [full, delta]
    log = store.activations()
    assert [(e["version"], e["previous"], e["kind"]) for e in log] == [(full, None, "full"), (delta, full, "embeddings")]


def test_manifest_lists_sha256_and_size_of_every_file_and_verify_catches_a_flipped_byte(tmp_path):
    store = ReleaseStore(tmp_path)
    version = make_release(store, "full", payload=b"0123456789")
    release = store.verify(version)
    # sha256(b"0123456789") worked out with hashlib
    assert release.manifest.files == {
        "user_embeddings.npy": FileDigest(sha256="84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882", bytes=10)
    }
    path = release.path / "user_embeddings.npy"
    path.write_bytes(b"0123456788")  # same size, one byte differs
    with pytest.raises(ReleaseError, match="user_embeddings.npy SHA-256 .* does not match"):
        store.verify(version)
    path.write_bytes(b"01234")
    with pytest.raises(ReleaseError, match="has 5 bytes, the manifest says 10"):
        store.verify(version)
    (release.path / "extra.bin").write_bytes(b"x")
    with pytest.raises(ReleaseError, match="not in the manifest"):
        store.verify(version)


def test_releases_are_immutable(tmp_path):
    store = ReleaseStore(tmp_path)
    version = make_release(store, "full")
    staging = store.staging_dir(version)
    (staging / "user_embeddings.npy").write_bytes(b"other")
    with pytest.raises(ReleaseError, match="immutable"):
        store.seal(staging, release_manifest(version, "full", model_version="m"))


def test_retention_keeps_the_newest_the_active_chain_and_what_they_need(tmp_path):
    store = ReleaseStore(tmp_path)
    f1 = make_release(store, "full")
    d1 = make_release(store, "embeddings", f1)
    d2 = make_release(store, "embeddings", d1)
    f2 = make_release(store, "full", model_version="2026-11-21.1")
    d3 = make_release(store, "embeddings", f2, model_version="2026-11-21.1")
    d4 = make_release(store, "embeddings", d3, model_version="2026-11-21.1")
    store.activate(d1, by="test")  # a rollback target in the old chain
    removed = store.retain(keep=2)
    # newest two: d3, d4 -> they need f2; active d1 -> needs f1; d2 is neither
    assert removed == [d2]
    assert store.versions() == [f1, d1, f2, d3, d4]
    store.activate(d4, by="test")
    assert store.retain(keep=2) == [f1, d1]
    assert [r.version for r in store.chain(d4)] == [f2, d3, d4]


def test_a_chain_with_a_missing_link_is_an_error_naming_it(tmp_path):
    store = ReleaseStore(tmp_path)
    f1 = make_release(store, "full")
    d1 = make_release(store, "embeddings", f1)
    d2 = make_release(store, "embeddings", d1)
    store.versioned.remove(d1)
    with pytest.raises(ReleaseError, match=f"needs {d1}, which is gone"):
        store.chain(d2)
    with pytest.raises(ReleaseNotFound):
        store.get(d1)


def test_activation_compares_and_swaps(tmp_path):
    store = ReleaseStore(tmp_path)
    f1 = make_release(store, "full")
    store.activate(f1, by="test")
    d1 = make_release(store, "embeddings", f1)
    d2 = make_release(store, "embeddings", f1)
    store.activate(d1, by="test", expected_active=f1)
    with pytest.raises(ActiveChanged, match=f"active release is {d1}, not {f1}"):
        store.activate(d2, by="test", expected_active=f1)
    assert store.active_version() == d1


def test_cleanup_removes_staging_and_never_activated_releases_only(tmp_path):
    store = ReleaseStore(tmp_path)
    f1 = make_release(store, "full")
    store.activate(f1, by="test")
    d1 = make_release(store, "embeddings", f1)
    store.activate(d1, by="test")
    store.activate(f1, by="test")  # rollback: d1 stays, it was active once
    orphan = make_release(store, "embeddings", f1)  # sealed, never activated
    store.staging_dir("00000009-full")
    removed = store.clean_incomplete()
    assert orphan in removed and any(r.startswith(".staging-00000009-full") for r in removed)
    assert store.versions() == [f1, d1]


def test_only_one_publisher_at_a_time(tmp_path):
    store = ReleaseStore(tmp_path)
    with store.publisher_lock(), pytest.raises(ReleaseError, match="another publisher holds"), ReleaseStore(tmp_path).publisher_lock():
        pass
    with store.publisher_lock():  # released on exit
        pass


def test_a_pointer_naming_garbage_is_an_error_not_a_path(tmp_path):
    store = ReleaseStore(tmp_path)
    (tmp_path / "ACTIVE").write_text("../../etc\n")
    with pytest.raises(ReleaseError, match="not a release version"):
        store.active_version()
    (tmp_path / "ACTIVE").write_text(json.dumps("x"))
    with pytest.raises(ReleaseError):
        store.active()
