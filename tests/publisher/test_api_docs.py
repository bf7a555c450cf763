"""The API docs pages as a person sees them: headless Chromium renders
``/docs`` (Swagger UI) and ``/redoc`` from the real service on a loopback
port, with every host name but 127.0.0.1 unresolvable, as on a machine
without internet. The assertions read the DOM after the page's scripts ran:
the HTML that the server sends names no endpoint, so a blank page fails."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from freshtower.publisher.routes import router
from freshtower.publisher.service import ServiceThread, create_app

from tests.publisher.conftest import publisher_settings

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # offline: only loopback resolves
    "--virtual-time-budget=15000",  # ms of page time for the scripts to fetch /openapi.json and render
]


def rendered_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, as Chromium dumps it."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install -y chromium), or install it by hand")
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"chromium exited {run.returncode}: {run.stderr[-2000:]}"
    return run.stdout


def local_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.fixture
def service(tmp_path):
    """The service with no release yet: the docs need none (503 on /healthz)."""
    with ServiceThread(create_app(publisher_settings(tmp_path))) as service:
        yield service


def test_swagger_ui_renders_the_recall_endpoint_without_internet(service, tmp_path):
    source = httpx.get(f"{service.url}/docs").text
    assert "/v1/recall" not in source  # only the rendered page can show it
    assert local_assets(source) and all(a.startswith("/static-offline-docs/") for a in local_assets(source)), local_assets(source)
    dom = rendered_dom(f"{service.url}/docs", tmp_path / "profile")
    paths = re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom)
    assert "/v1/recall" in paths, dom[-3000:]
    assert set(paths) == {
        "/v1/recall",
        "/v1/prerank",
        "/v1/recommend",
        "/v1/users/{user_id}/embedding",
        "/v1/releases",
        "/v1/releases/{version}/activate",
        "/healthz",
        "/metrics",
    }


def test_redoc_renders_the_recall_endpoint_without_internet(service, tmp_path):
    source = httpx.get(f"{service.url}/redoc").text
    assert "/v1/recall" not in source and "fonts.googleapis" not in source
    assert all(a.startswith("/static-offline-docs/") for a in local_assets(source)), local_assets(source)
    dom = rendered_dom(f"{service.url}/redoc", tmp_path / "profile")
    assert "/v1/recall" in dom and "Recall Endpoint" in dom, dom[-3000:]


def test_the_check_fails_on_a_docs_page_that_needs_a_cdn(tmp_path):
    # The same routes behind FastAPI's own /docs, whose scripts come from a
    # CDN: offline, the page stays blank and the check above would fail.
    cdn_app = FastAPI(title="CDN docs")
    cdn_app.include_router(router)
    with ServiceThread(cdn_app) as service:
        assert "cdn.jsdelivr.net" in httpx.get(f"{service.url}/docs").text
        dom = rendered_dom(f"{service.url}/docs", tmp_path / "profile")
    assert 'id="swagger-ui"' in dom and "/v1/recall" not in dom
