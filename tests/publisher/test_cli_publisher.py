from __future__ import annotations

import json

from typer.testing import CliRunner

from freshtower.cli import app

runner = CliRunner()


def test_publish_and_serve_have_help():
    for args in (["publish", "--help"], ["serve", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_publish_once_releases_the_full_model_then_has_nothing_to_do(data_dir, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_DATA_DIR", str(data_dir))
    monkeypatch.setenv("FRESHTOWER_FREQUENCY__BUCKETS", "16384")
    result = runner.invoke(app, ["publish", "--once", "--no-kafka"])
    assert result.exit_code == 0, result.output
    full, delta = json.loads(result.stdout.strip().splitlines()[-1])
    assert (full["status"], full["version"]) == ("published", "00000001-full")
    assert delta["status"] == "skipped" and "no online checkpoint" in delta["reason"]
    result = runner.invoke(app, ["publish", "--once", "--no-kafka"])
    full, _ = json.loads(result.stdout.strip().splitlines()[-1])
    assert full["status"] == "skipped" and "was released as 00000001-full" in full["reason"]
