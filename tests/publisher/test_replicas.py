"""Recall replicas beyond one machine: two `freshtower serve` processes on one
S3-compatible release store (moto's standalone server on loopback) and the
user-embeddings topic (the Tansu broker), the publisher in this process.

Both serve a new release's user rows within a second of the rows reaching
the topic and within a second of each other, then the same release once
they read the pointer; one replica killed with SIGKILL while a release is
made, started again, catches up (the store for the release, the topic for
the rows). Also in process: followed rows arrive before the pointer is read,
and the rules of which rows apply (pure)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
from freshtower.publisher.new_item_index import NewItemIndex
from freshtower.trainer.retrieval import IndexSettings
import pytest
from freshtower.publisher.embedding_topic import EmbeddingTopic
from freshtower.publisher.publish import Publisher
from freshtower.publisher.release_store import open_release_store
from freshtower.publisher.service import create_app
from freshtower.publisher.serving import ServingState
from freshtower.publisher.topic_follower import apply_rows, carry_rows
from freshtower.trainer.online import OnlineTrainer
from starlette.testclient import TestClient

from freshtower.core.ports import free_port
from tests.publisher.conftest import publisher_settings, s3_overrides
from tests.publisher.service_process import ServiceProcess, health


# --- which rows apply (pure) -----------------------------------------------------------


def state_at(version: str, model: str = "m1", dim: int = 2) -> ServingState:
    return ServingState(
        version=version, full_version="00000001-full", model_version=model, chain=(version,), tower=SimpleNamespace(id_dim=dim),
        user_rows={}, id_table=np.zeros((1, dim), np.float32), row_event_time_ms=np.zeros(1, np.int64), index=None, item_ids=(),
        item_set=frozenset(), index_settings=IndexSettings(), new_items=NewItemIndex.empty(), newest_click_event_time_ms=5, newest_click_is_bound=False, loaded_at=0.0,
    )  # fmt: skip


def row(user: str, release: str, model: str = "m1", value: float = 1.0, event_time_ms: int | None = 9) -> dict:
    return {"user_id": user, "release": release, "model_version": model, "event_time_ms": event_time_ms,
            "dim": 2, "embedding": np.full(2, value, "<f4")}  # fmt: skip


def test_only_rows_of_newer_releases_of_the_served_model_apply():
    state = state_at("00000003-embeddings")
    done = apply_rows(state, [
        row("u1", "00000004-embeddings", value=4.0),
        row("u1", "00000002-embeddings", value=2.0),  # older than what is served
        row("u2", "00000003-embeddings"),  # what is served already
        row("u3", "00000005-embeddings", model="m2"),  # another embedding space
        row("u4", "00000005-embeddings", value=5.0, event_time_ms=None),
        row("u4", "00000004-embeddings", value=4.0),  # a replay of an older release after a newer one
    ])  # fmt: skip
    assert (done.applied, done.skipped) == (2, 4)
    followed = done.state.followed
    assert set(followed) == {"u1", "u4"} and followed["u1"].vector.tolist() == [4.0, 4.0]
    assert followed["u4"].release == "00000005-embeddings"
    assert done.state.followed_through == "00000005-embeddings" and done.state.newest_click_event_time_ms == 9
    assert state.followed == {}  # the served state is never changed
    assert apply_rows(state, [row("u1", "00000004-embeddings")], floor=6).applied == 0  # after a rollback from 6


def test_a_swap_keeps_the_followed_rows_still_ahead_of_the_loaded_release():
    ahead = apply_rows(state_at("00000003-embeddings"), [row("u1", "00000004-embeddings"), row("u2", "00000006-embeddings")]).state
    loaded = carry_rows(ahead, state_at("00000004-embeddings"))
    assert set(loaded.followed) == {"u2"} and loaded.followed_through == "00000006-embeddings"
    assert carry_rows(ahead, state_at("00000007-full", model="m2")).followed == {}


# --- the real thing --------------------------------------------------------------------


def delta_rows(store, version: str) -> dict[str, np.ndarray]:
    release = store.get(version)
    ids = json.loads(release.file("user_ids.json").read_text())
    return {u: v for u, v in zip(ids, np.load(release.file("user_embeddings.npy"))) if u}


def embedding(url: str, user: str) -> np.ndarray | None:
    try:
        response = httpx.get(f"{url}/v1/users/{user}/embedding", timeout=2)
    except httpx.TransportError:
        return None
    return np.array(response.json()["id_embedding"], np.float32) if response.status_code == 200 else None


def new_replica(settings, data_dir: Path, name: str) -> ServiceProcess:
    """A replica (not started yet) with its own data dir (its S3 cache)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
    env.update(
        PYTHONPATH=os.getcwd(),
        FRESHTOWER_DATA_DIR=str(data_dir),
        FRESHTOWER_KAFKA=settings.kafka,
        FRESHTOWER_TOPICS=settings.topics.model_dump_json(),
        FRESHTOWER_PUBLISHER=settings.publisher.model_dump_json(),
        FRESHTOWER_SERVICE=settings.service.model_dump_json(),
        FRESHTOWER_MODEL=settings.model.model_dump_json(),
    )
    return ServiceProcess(env, free_port(), data_dir.with_suffix(".log"), name)


def first_seen(replicas: list[ServiceProcess], user: str, expected: np.ndarray, timeout: float) -> dict[str, float]:
    """When each replica first served ``expected`` as ``user``'s row (monotonic seconds)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(replicas) and time.monotonic() < deadline:
        for replica in replicas:
            if replica.name not in seen and (got := embedding(replica.url, user)) is not None and np.array_equal(got, expected):
                seen[replica.name] = time.monotonic()
        time.sleep(0.005)
    return seen


def replica_settings(data_dir, kafka_broker, s3_server, poll_seconds: float):
    bucket = s3_server.new_bucket()
    return publisher_settings(
        data_dir,
        kafka=kafka_broker.bootstrap,
        topics={"user_embeddings": f"user-embeddings-{uuid.uuid4().hex[:8]}"},
        publisher={"kafka_enabled": True, **s3_overrides(s3_server, bucket)},
        service={"follow_topic": True, "poll_seconds": poll_seconds},
    )


def changed_user(store, version: str, before: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    rows = delta_rows(store, version)
    user = next(u for u, v in sorted(rows.items()) if u not in before or not np.array_equal(before[u], v))
    return user, rows[user]


@pytest.mark.slow
def test_followed_rows_are_served_before_the_replica_reads_the_pointer(data_dir, kafka_broker, s3_server):
    settings = replica_settings(data_dir, kafka_broker, s3_server, poll_seconds=600)  # the pointer is read once, at start
    topic = EmbeddingTopic(settings.bootstrap_servers, settings.topics.user_embeddings, partitions=2)
    OnlineTrainer.start(settings).run(max_batches=3, prefetch=False)
    with Publisher(settings, topic=topic) as publisher:
        _, first = publisher.tick(now_s=0.0)
        store = publisher.store
        with TestClient(create_app(settings.model_copy(update={"data_dir": data_dir / "replica"}))) as http:
            assert http.get("/healthz").json()["serving"] == first.version
            OnlineTrainer.start(settings).run(max_batches=3, prefetch=False)
            second = publisher.publish_delta_if_due(now_s=1e6)
            publisher.send_pending_to_topic()
            user, expected = changed_user(store, second.version, delta_rows(store, first.version))
            deadline, got = time.monotonic() + 10, None
            while time.monotonic() < deadline and not np.array_equal(got, expected):
                got = np.array(http.get(f"/v1/users/{user}/embedding").json()["id_embedding"], np.float32)
                time.sleep(0.01)
            body = http.get("/healthz").json()
    np.testing.assert_array_equal(got, expected)
    assert body["serving"] == first.version  # the pointer was not read again: the row came from the topic
    assert body["followed"]["through"] == second.version and body["followed"]["rows"] >= 1


@pytest.mark.slow
def test_two_replicas_on_one_s3_store_serve_the_same_rows_and_release_and_one_killed_catches_up(
    data_dir, kafka_broker, s3_server, tmp_path
):
    settings = replica_settings(data_dir, kafka_broker, s3_server, poll_seconds=0.25)
    topic = EmbeddingTopic(settings.bootstrap_servers, settings.topics.user_embeddings, partitions=2)
    OnlineTrainer.start(settings).run(max_batches=3, prefetch=False)
    replicas = [new_replica(settings, tmp_path / name, name) for name in ("a", "b")]
    figures = {}
    try:
        with Publisher(settings, topic=topic) as publisher:
            store = publisher.store
            _, first = publisher.tick(now_s=0.0)
            for replica in replicas:
                replica.start()
            for replica in replicas:
                replica.wait_serving(first.version)

            # A new release: the rows reach both replicas through the topic, the release through the store.
            OnlineTrainer.start(settings).run(max_batches=3, prefetch=False)
            second = publisher.publish_delta_if_due(now_s=1e6)
            assert second.status == "published"
            activated = time.monotonic()
            publisher.send_pending_to_topic()
            sent = time.monotonic()
            user, expected = changed_user(store, second.version, delta_rows(store, first.version))
            seen = first_seen(replicas, user, expected, timeout=10)
            assert set(seen) == {"a", "b"}, f"row of {user} seen by {sorted(seen)} only"
            served = {r.name: r.wait_serving(second.version, timeout=10) for r in replicas}
            figures["row after sent"] = {n: round(t - sent, 3) for n, t in seen.items()}
            figures["release after activation"] = {n: round(t - activated, 3) for n, t in served.items()}
            figures["send"] = round(sent - activated, 3)
            print("replica lag (s):", figures)
            assert max(seen.values()) - sent <= 1.0 and abs(seen["a"] - seen["b"]) <= 1.0
            assert max(served.values()) - activated <= 1.0 + figures["send"]
            assert abs(served["a"] - served["b"]) <= 1.0

            # Replica b killed; a release is made while it is down; b started again catches up.
            a, b = replicas
            b.kill()
            OnlineTrainer.start(settings).run(max_batches=3, prefetch=False)
            third = publisher.publish_delta_if_due(now_s=2e6)
            assert third.status == "published"
            publisher.send_pending_to_topic()
            a.wait_serving(third.version, timeout=10)
            restarted = time.monotonic()
            b.start()
            b.wait_serving(third.version)
            figures["restart to serving"] = round(time.monotonic() - restarted, 3)
            print("replica lag (s):", figures)
            for version in (second.version, third.version):
                for user in sorted(delta_rows(store, version))[:20]:
                    np.testing.assert_array_equal(embedding(a.url, user), embedding(b.url, user), err_msg=f"{user} of {version}")
            assert health(a.url)["serving"] == health(b.url)["serving"] == third.version
    finally:
        for replica in replicas:
            replica.stop()
