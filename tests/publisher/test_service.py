"""The recall service through its real app: in process through Starlette's
``TestClient`` (the lifespan and the release watcher run as under uvicorn),
and served by uvicorn on a free loopback port where a real socket matters:
swaps under concurrent clients. (``freshtower serve`` in its own process is
tested in test_cli_publisher.py, the docs pages in a browser in
test_api_docs.py.)"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
from freshtower.publisher.publish import Publisher
from freshtower.publisher.releases import ReleaseStore
from freshtower.publisher.service import ServiceThread, create_app
from freshtower.trainer.online import OnlineTrainer
from freshtower.trainer.retrieval import ExactRetriever
from starlette.testclient import TestClient

from freshtower.core.batches import SampleColumns, read_batch
from tests.publisher.conftest import publisher_settings

TOKEN = "s3cret-admin-token"


def in_process(settings) -> TestClient:
    """The app in this process; ``with`` runs its lifespan (release loaded, watcher started) and stops it."""
    return TestClient(create_app(settings))


def train_online(settings, batches: int) -> OnlineTrainer:
    trainer = OnlineTrainer.start(settings)
    trainer.run(max_batches=batches, prefetch=False)
    return trainer


def wait_until_serving(http: TestClient | httpx.Client, version: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        response = http.get("/healthz")
        body = response.json()
        if body.get("serving") == version:
            return body
        time.sleep(0.02)
    raise AssertionError(f"service did not pick up {version} within {timeout} s: {body}")


def request_for(samples: SampleColumns, i: int, k: int = 20) -> dict:
    features = {name: column[i] for name, column in samples.user_categorical.items()}
    features.update({name: float(samples.user_numeric[i, j]) for j, name in enumerate(("activity_7d", "hour_sin", "hour_cos"))})
    return {"user_id": samples.user_ids[i], "user_features": features, "k": k}


@pytest.fixture
def published(data_dir):
    """A full release and a first delta; the trainer and the settings."""
    settings = publisher_settings(data_dir, service={"admin_token": TOKEN})
    trainer = train_online(settings, 3)
    with Publisher(settings) as publisher:
        full, delta = publisher.tick(now_s=0.0)
    return settings, trainer, full.version, delta.version


@pytest.mark.slow
def test_round_trip_checkpoint_publish_serve_recall_follows_new_clicks(data_dir):
    settings = publisher_settings(data_dir)
    trainer = train_online(settings, 3)
    with Publisher(settings) as publisher, in_process(settings) as http:
        assert http.get("/healthz").status_code == 503  # nothing released yet
        assert http.post("/v1/recall", json={"user_id": "u1"}).status_code == 503
        _, first = publisher.tick(now_s=0.0)
        wait_until_serving(http, first.version)

        # The user who clicks most in the next hour of batches.
        upcoming = trainer.pending()[:6]
        clicks = SampleColumns.concat([read_batch(ref, trainer.spec) for ref in upcoming], trainer.spec)
        user, count = Counter(clicks.user_ids).most_common(1)[0]
        assert count >= 3
        request = request_for(clicks, max(i for i, u in enumerate(clicks.user_ids) if u == user))
        before = http.post("/v1/recall", json=request).json()
        assert before["releases"] == {
            "active": first.version,
            "full": "00000001-full",
            "embeddings": first.version,
            "model_version": "2026-11-20.1",
        }

        trainer = train_online(settings, 6)  # resumes from the checkpoint and learns those clicks
        second = publisher.publish_delta_if_due(now_s=1e6)
        assert second.status == "published"
        wait_until_serving(http, second.version)
        after = http.post("/v1/recall", json=request).json()

    assert after["releases"]["active"] == second.version
    assert [i["item_id"] for i in after["items"]] != [i["item_id"] for i in before["items"]]
    assert not after["cold_start"]
    assert after["freshness"]["user_embedding_event_time_ms"] >= upcoming[0].window_start_ms
    assert after["freshness"]["newest_click_event_time_ms"] > before["freshness"]["newest_click_event_time_ms"]
    assert (
        after["freshness"]["newest_click_event_time_ms"]
        == ReleaseStore(settings.releases_dir).get(second.version).manifest.newest_click_event_time_ms
    )
    # What the service returned is what exact search over the online trainer's own model returns.
    model = trainer.model
    released_items = [i["item_id"] for i in after["items"]]
    catalogue = model.catalogue_vectors().numpy()[:300]
    inputs = model.user_inputs(
        [user],
        {k: [v] for k, v in request["user_features"].items() if isinstance(v, str)},
        np.array([[request["user_features"][n] for n in ("activity_7d", "hour_sin", "hour_cos")]], np.float32),
    )
    scores, indices = ExactRetriever(catalogue).search(model.user_vectors(inputs).detach().numpy(), 20)
    assert released_items == [model.catalogue.ids[j] for j in indices[0]]
    np.testing.assert_allclose([i["score"] for i in after["items"]], scores[0], atol=1e-5)


@pytest.mark.slow
def test_hot_swaps_under_concurrent_requests_fail_no_request(published):
    settings, trainer, full, first = published
    samples = read_batch(trainer.pending()[0], trainer.spec)
    requests = [request_for(samples, i, k=50) for i in range(0, min(len(samples), 400), 7)]
    stop = threading.Event()
    failures: list[str] = []
    versions: Counter = Counter()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        deadline = time.monotonic() + 90  # bounded in time and count
        with httpx.Client(base_url=service.url, timeout=10) as http:
            for _ in range(1500):
                if stop.is_set() or time.monotonic() > deadline:
                    break
                try:
                    response = http.post("/v1/recall", json=requests[rng.integers(len(requests))])
                    ok = response.status_code == 200 and len(response.json()["items"]) == 50
                    with lock:
                        versions[response.json()["releases"]["active"]] += 1 if ok else 0
                        if not ok:
                            failures.append(f"{response.status_code}: {response.text[:200]}")
                except Exception as error:  # a dropped connection counts as a failure
                    with lock:
                        failures.append(repr(error))

    with ServiceThread(create_app(settings)) as service, httpx.Client(base_url=service.url) as admin:
        wait_until_serving(admin, first)
        clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
        for thread in clients:
            thread.start()
        swapped = [first]
        with Publisher(settings) as publisher:
            for round_ in range(4):
                train_online(settings, 1)
                outcome = publisher.publish_delta_if_due(now_s=1e6 * (round_ + 1))
                assert outcome.status == "published", outcome
                wait_until_serving(admin, outcome.version)
                swapped.append(outcome.version)
                time.sleep(0.2)
        # and a rollback to the full release, under the same load
        response = admin.post(f"/v1/releases/{full}/activate", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.text
        time.sleep(0.3)
        stop.set()
        for thread in clients:
            thread.join(120)

    print(f"answered by release: {dict(versions)}")
    assert failures == []
    assert sum(versions.values()) >= 100
    assert len(versions) >= 3 and full in versions  # requests were answered by several releases, across swaps


def test_rollback_needs_the_admin_token_and_serves_the_older_release(published):
    settings, _, full, first = published
    with in_process(settings) as http:
        wait_until_serving(http, first)
        url = f"/v1/releases/{full}/activate"
        response = http.post(url)
        assert response.status_code == 401 and "admin token" in response.json()["detail"]
        assert http.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/v1/releases/..%2F..%2Fetc/activate", headers={"Authorization": f"Bearer {TOKEN}"}).status_code in (404, 422)
        response = http.post("/v1/releases/not-a-version/activate", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 422 and "not a release version" in response.json()["detail"]
        response = http.post("/v1/releases/00000099-full/activate", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 404

        response = http.post(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.json() == {"active": full, "previous": first}
        assert ReleaseStore(settings.releases_dir).active_version() == full
        recall = http.post("/v1/recall", json={"user_id": "nobody"}).json()
        assert recall["releases"] == {"active": full, "full": full, "embeddings": None, "model_version": "2026-11-20.1"}
        # Only the full model stands behind it: its newest training click,
        # which the full trainer records (exact, not the data-end bound).
        from freshtower.trainer.artifacts import full_models_dir, read_manifest

        model = read_manifest(full_models_dir(settings) / "2026-11-20.1").manifest
        assert not recall["freshness"]["is_upper_bound"]
        assert recall["freshness"]["newest_click_event_time_ms"] == model.newest_click_event_time_ms
        assert model.newest_click_event_time_ms < model.data_end_ms
        listing = http.get("/v1/releases").json()
        assert listing["active"] == listing["serving"] == full
        assert [(r["version"], r["active"]) for r in listing["releases"]] == [(full, True), (first, False)]
        # and forward again
        assert http.post(f"/v1/releases/{first}/activate", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        wait_until_serving(http, first)


def test_activation_is_refused_entirely_without_a_configured_token(published):
    settings, _, full, first = published
    settings = publisher_settings(settings.data_dir)  # no admin token
    with in_process(settings) as http:
        wait_until_serving(http, first)
        for headers in ({}, {"Authorization": "Bearer x"}, {"Authorization": f"Bearer {TOKEN}"}):
            response = http.post(f"/v1/releases/{full}/activate", headers=headers)
            assert response.status_code == 403 and "no admin token is configured" in response.json()["detail"]
        assert ReleaseStore(settings.releases_dir).active_version() == first


def test_a_release_that_fails_its_checksum_is_refused_and_the_current_one_stays(published):
    settings, _, _, first = published
    store = ReleaseStore(settings.releases_dir)
    with in_process(settings) as http:
        wait_until_serving(http, first)
        train_online(settings, 1)
        with Publisher(settings) as publisher:
            second = publisher.publish_delta_if_due(now_s=1e6, activate=False)  # sealed, not yet active
        path = store.get(second.version).file("user_embeddings.npy")
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # one byte of the last row
        path.write_bytes(bytes(data))
        store.activate(second.version, by="test")  # the pointer names the corrupt release

        deadline = time.monotonic() + 10
        while http.get("/healthz").json()["status"] != "degraded" and time.monotonic() < deadline:
            time.sleep(0.02)
        health = http.get("/healthz").json()
        assert health["status"] == "degraded" and health["serving"] == first and health["active"] == second.version
        assert "user_embeddings.npy SHA-256" in health["refused"]
        assert http.post("/v1/recall", json={"user_id": "nobody"}).json()["releases"]["active"] == first
        assert "freshtower_release_refused_total 1.0" in http.get("/metrics").text
        # an admin cannot force it either
        response = http.post(f"/v1/releases/{second.version}/activate", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 409 and "SHA-256" in response.json()["detail"]


MALFORMED = [
    ({}, "body.user_id: Field required"),
    ({"user_id": ""}, "body.user_id: String should have at least 1 character"),
    ({"user_id": "u1", "k": 0}, "body.k: Input should be greater than or equal to 1"),
    ({"user_id": "u1", "k": 5000}, "k = 5000 is above the limit service.max_k = 1000"),
    ({"user_id": "u1", "k": "ten"}, "body.k: Input should be a valid integer"),
    ({"user_id": "u1", "user_features": {"city": 7}}, "'city' is categorical and needs a string"),
    ({"user_id": "u1", "user_features": {"shoe_size": 44}}, "unknown user feature(s) ['shoe_size']"),
    ({"user_id": "u1", "user_features": {"activity_7d": [1]}}, "body.user_features.activity_7d"),
    ({"user_id": "u1", "extra": 1}, "body.extra: Extra inputs are not permitted"),
    ("not json", "malformed request"),
]


def test_malformed_requests_get_a_4xx_with_a_clear_message(published):
    settings, _, _, first = published
    with in_process(settings) as http:
        wait_until_serving(http, first)
        for body, message in MALFORMED:
            if isinstance(body, str):
                response = http.post("/v1/recall", content=body, headers={"content-type": "application/json"})
            else:
                response = http.post("/v1/recall", json=body)
            assert response.status_code == 422, (body, response.text)
            assert message in response.json()["detail"], (body, response.text)
        assert http.get("/v1/users/" + "x" * 300 + "/embedding").status_code == 422


def test_embedding_endpoint_metrics_and_openapi(published):
    settings, trainer, full, first = published
    manifest = ReleaseStore(settings.releases_dir).get(first).manifest
    with in_process(settings) as http:
        wait_until_serving(http, first)
        user = next(u for u in trainer.model.user_ids.row_ids() if u and trainer.row_event_time_ms[trainer.model.user_ids.row_of(u)] > 0)
        body = http.get(f"/v1/users/{user}/embedding").json()
        row = trainer.model.user_ids.row_of(user)
        np.testing.assert_allclose(body["id_embedding"], trainer.model.user_tower.id_embedding[row].detach().numpy(), atol=1e-7)
        assert not body["cold_start"] and body["event_time_ms"] == int(trainer.row_event_time_ms[row])
        cold = http.get("/v1/users/stranger/embedding").json()
        assert cold["cold_start"] and cold["dim"] == 64 and cold["event_time_ms"] is None

        http.post("/v1/recall", json={"user_id": "stranger"})
        http.post("/v1/recall", json={"user_id": "stranger", "k": 0})
        metrics = http.get("/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
        newest = manifest.newest_click_event_time_ms / 1000
        assert values["freshtower_embeddings_newest_click_event_time_seconds"] == pytest.approx(newest)
        age = values["freshtower_embeddings_freshness_age_seconds"]
        assert age == pytest.approx(time.time() - newest, abs=60)
        assert 'freshtower_recall_requests_total{outcome="ok"} 1.0' in metrics
        assert 'freshtower_recall_requests_total{outcome="bad_request"} 1.0' in metrics
        assert "freshtower_recall_cold_start_total 1.0" in metrics
        assert f'freshtower_release_info{{full_version="{full}",model_version="2026-11-20.1",version="{first}"}} 1.0' in metrics

        schema = http.get("/openapi.json").json()
        assert {
            "/v1/recall",
            "/v1/users/{user_id}/embedding",
            "/v1/releases",
            "/v1/releases/{version}/activate",
            "/healthz",
            "/metrics",
        } <= set(schema["paths"])
        assert http.get("/docs").status_code == 200


def test_a_garbage_pointer_leaves_the_service_up_and_unavailable(tmp_path):
    settings = publisher_settings(tmp_path)
    settings.releases_dir.mkdir(parents=True)
    (settings.releases_dir / "ACTIVE").write_text("../../etc/passwd\n")
    with in_process(settings) as http:
        assert http.get("/healthz").status_code == 503
        response = http.post("/v1/recall", json={"user_id": "u1"})
        assert response.status_code == 503 and "no release loaded yet" in response.json()["detail"]
