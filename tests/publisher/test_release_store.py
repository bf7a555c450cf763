"""The release store on both backends: a local directory and an S3 bucket on
moto's standalone server (loopback). Publish-then-pointer, checksums on
load, keys that never become paths unchecked, the locks."""

from __future__ import annotations

import hashlib

import pytest
from freshtower.publisher.release_store import StoreConfigError, check_key, open_release_store, parse_store_url
from freshtower.publisher.releases import ActiveChanged, ReleaseError, ReleaseStore

from tests.publisher.conftest import publisher_settings, s3_overrides
from tests.publisher.test_releases import make_release


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> ReleaseStore:
    if request.param == "file":
        settings = publisher_settings(tmp_path, publisher={"release_store": f"file://{tmp_path}/releases"})
    else:
        server = request.getfixturevalue("s3_server")
        settings = publisher_settings(tmp_path, publisher=s3_overrides(server, server.new_bucket()))
    return open_release_store(settings)


def s3_store(server, tmp_path, bucket: str | None = None) -> tuple[ReleaseStore, str]:
    bucket = bucket or server.new_bucket()
    return open_release_store(publisher_settings(tmp_path, publisher=s3_overrides(server, bucket))), bucket


def test_publish_then_pointer_chain_and_checksums_on_either_backend(store):
    assert store.versions() == [] and store.active_version() is None
    full = make_release(store, "full", payload=b"full rows")
    assert store.versions() == [full] and store.active_version() is None  # sealed, not active
    store.activate(full, by="test")
    delta = make_release(store, "embeddings", parent=full, payload=b"delta rows")
    with pytest.raises(ActiveChanged):
        store.activate(delta, by="test", expected_active=delta)  # compare-and-swap
    assert store.activate(delta, by="test", expected_active=full) == full
    assert [r.version for r in store.chain(delta)] == [full, delta]
    verified = store.verify(delta)
    assert verified.file("user_embeddings.npy").read_bytes() == b"delta rows"
    expected = hashlib.sha256(b"delta rows").hexdigest()
    assert verified.manifest.files["user_embeddings.npy"].sha256 == expected
    assert [e["version"] for e in store.activations()] == [full, delta]


def test_an_s3_release_without_its_manifest_object_does_not_exist_and_is_cleaned(s3_server, tmp_path):
    store, bucket = s3_store(s3_server, tmp_path)
    client = s3_server.client()
    full = make_release(store, "full")
    store.activate(full, by="test")
    # A publisher killed mid-upload: files of the next version, no manifest yet.
    client.put_object(Bucket=bucket, Key="prod/00000002-embeddings/user_embeddings.npy", Body=b"half")
    assert store.versions() == [full]
    assert store.next_version("embeddings") == "00000002-embeddings"
    assert "00000002-embeddings" in store.clean_incomplete()
    assert "prod/00000002-embeddings/user_embeddings.npy" not in {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert store.active_version() == full


def test_a_corrupt_s3_object_is_refused_naming_the_file_and_fetched_again_once_repaired(s3_server, tmp_path):
    store, bucket = s3_store(s3_server, tmp_path)
    client = s3_server.client()
    full = make_release(store, "full", payload=b"good rows")
    key = f"prod/{full}/user_embeddings.npy"
    client.put_object(Bucket=bucket, Key=key, Body=b"evil rows")  # same size, other bytes
    with pytest.raises(ReleaseError, match="user_embeddings.npy"):
        store.verify(full)
    client.put_object(Bucket=bucket, Key=key, Body=b"good rows")
    assert store.verify(full).file("user_embeddings.npy").read_bytes() == b"good rows"  # the bad copy was dropped
    client.put_object(Bucket=bucket, Key=f"prod/{full}/extra.bin", Body=b"x")
    with pytest.raises(ReleaseError, match="not in the manifest"):
        store.verify(full)


def test_a_second_store_in_another_process_sees_the_release_only_after_the_pointer(s3_server, tmp_path):
    writer, bucket = s3_store(s3_server, tmp_path / "writer")
    reader, _ = s3_store(s3_server, tmp_path / "reader", bucket)
    full = make_release(writer, "full")
    assert reader.active_version() is None
    writer.activate(full, by="test")
    assert reader.active_version() == full
    assert reader.verify(full).path != writer.path_of(full)  # its own local copy


@pytest.mark.parametrize("key", ["../ACTIVE", "a/b/c", ".lock", "00000001-full/../../etc", "", "00000001-full/"])
def test_keys_are_checked_before_they_name_an_object_or_a_path(s3_server, tmp_path, key):
    store, _ = s3_store(s3_server, tmp_path)
    with pytest.raises(ValueError, match="not a store key"):
        check_key(key)
    with pytest.raises(ValueError):
        store.versioned.backend.read(key)


def test_an_odd_object_name_in_the_bucket_never_becomes_a_local_path(s3_server, tmp_path):
    store, bucket = s3_store(s3_server, tmp_path)
    full = make_release(store, "full")
    s3_server.client().put_object(Bucket=bucket, Key=f"prod/{full}/..", Body=b"x")
    with pytest.raises(ValueError, match="not a store key"):
        store.verify(full)


def test_one_publisher_at_a_time_on_s3(s3_server, tmp_path):
    first, bucket = s3_store(s3_server, tmp_path / "a")
    second, _ = s3_store(s3_server, tmp_path / "b", bucket)
    with first.publisher_lock():
        with pytest.raises(ReleaseError, match="another publisher holds"):
            with second.publisher_lock():
                pass
    with second.publisher_lock():  # released on exit
        pass


def test_store_urls_are_checked():
    assert parse_store_url("s3://my-bucket").prefix == ""
    for bad in ("s3://B", "http://x/y", "file://relative/x", "s3://bucket/a/.hidden"):
        with pytest.raises(StoreConfigError):
            parse_store_url(bad)
    with pytest.raises(ValueError, match="release_store"):
        publisher_settings(".", publisher={"release_store": "ftp://x"})
