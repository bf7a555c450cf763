from __future__ import annotations

import json

from typer.testing import CliRunner

from freshtower.app.cli import app

runner = CliRunner()


def test_every_command_has_help():
    for args in (["--help"], ["train", "--help"], ["train", "full", "--help"], ["train", "online", "--help"], ["simulate", "--help"], ["run", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_train_full_without_batches_fails_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["train", "full", "--day", "2026-11-20"])
    assert result.exit_code == 1
    assert "no complete batches for 2026-11-20" in result.output


def test_online_without_a_full_model_fails_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["train", "online"])
    assert result.exit_code == 1
    assert "freshtower train full" in result.output


def test_simulate_then_train_full_then_online(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FRESHTOWER_STREAMS__WINDOW_SECONDS", "900")
    monkeypatch.setenv("FRESHTOWER_FREQUENCY__BUCKETS", "4096")
    events = tmp_path / "events.jsonl"
    result = runner.invoke(app, ["simulate", "--days", "2", "--batches", "--events", str(events), "--users", "200", "--items", "100", "--requests-per-day", "800"])
    assert result.exit_code == 0, result.output
    topics = {json.loads(line)["topic"] for line in events.read_text().splitlines()}
    assert topics == {"impressions", "clicks", "rank-logs"}

    result = runner.invoke(app, ["train", "full", "--day", "2026-11-20"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["version"] == "2026-11-20.1" and "recall@50" in summary["metrics"]["exact"]

    result = runner.invoke(app, ["train", "online", "--max-batches", "3"])
    assert result.exit_code == 0, result.output
    assert "3 batches" in result.output
