"""The publisher on a real full disk and a read-only release store (a
size-limited tmpfs): a release that cannot be written stops with the file
named, no partial release is ever visible, the pointer keeps naming a
complete, checksummed release that serving loads, and the next tick after
space returns publishes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from freshtower.publisher.publish import Publisher
from freshtower.publisher.releases import ReleaseStore
from freshtower.publisher.serving import load_state

from freshtower.core.storage import StorageError
from tests.publisher.conftest import DAY1, publisher_settings
from tests.publisher.test_publish import released_with_more_to_come
from tests.storage_faults import tree_bytes


def assert_served_intact(store: ReleaseStore, active: str, before: dict, served) -> None:
    assert store.active_version() == active  # the pointer never moved
    for release in store.chain(active):
        store.verify(release.version)  # every file of the active chain matches its checksum
    assert {r.version: r.manifest.files for r in store.list()} == before  # no new release, sealed or partial
    assert not [p.name for p in store.root.iterdir() if p.name.startswith(".staging-")]  # its space came back
    np.testing.assert_array_equal(load_state(store, active).id_table, served.id_table)


def test_a_full_disk_or_a_read_only_store_stops_the_release_naming_the_file_and_the_next_tick_publishes(data_dir, small_disk):
    disk = small_disk(tree_bytes(data_dir) + (48 << 20))
    shutil.copytree(data_dir, disk.path / "data")
    settings = publisher_settings(disk.path / "data")
    store, active, before, served = released_with_more_to_come(settings)

    with Publisher(settings) as publisher:
        disk.fill()
        with pytest.raises(StorageError) as caught:
            publisher.publish_full_if_new(now_s=1e9)
        message = str(caught.value)
        assert message.startswith(f"cannot write {settings.releases_dir}/.staging-") and "No space left on device" in message, message
        assert_served_intact(store, active, before, served)
        with pytest.raises(StorageError, match="No space left on device"):
            publisher.publish_delta_if_due(now_s=1e9, force=True)
        assert_served_intact(store, active, before, served)
        disk.free()

    disk.read_only()  # a read-only store: a publisher does not even start, and says where
    with pytest.raises(StorageError) as caught, Publisher(settings):
        pass
    assert str(caught.value).startswith(f"cannot write {settings.releases_dir}/.publisher.lock: Read-only file system"), str(caught.value)
    assert_served_intact(store, active, before, served)
    disk.writable()

    with Publisher(settings) as publisher:  # space is back and the store writable: the next tick publishes
        full, delta = publisher.tick(now_s=1e9)
        assert full.status == "published" and store.get(full.version).model_version == f"{DAY1}.1"
        assert store.active_version() == full.version
        for release in store.chain(store.active_version()):
            store.verify(release.version)
