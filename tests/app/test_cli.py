from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from freshtower.app.cli import app

runner = CliRunner()


def said(result) -> str:
    """The output with its line wrapping undone (the message wraps at the
    terminal width, so where depends on the length of the path in it)."""
    return " ".join(result.output.split())


def test_every_command_has_help():
    for args in (["--help"], ["train", "--help"], ["train", "full", "--help"], ["train", "online", "--help"], ["simulate", "--help"], ["run", "--help"], ["experiment", "--help"], ["publish", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_train_full_without_batches_fails_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["train", "full", "--day", "2026-11-20"])
    assert result.exit_code == 1
    assert "no complete batches for 2026-11-20" in said(result)


def test_online_without_a_full_model_fails_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["train", "online"])
    assert result.exit_code == 1
    assert "freshtower train full" in said(result)


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


def test_experiment_options_are_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_DATA_DIR", str(tmp_path / "data"))
    result = runner.invoke(app, ["experiment", "--data", "nope", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--data must be one of simulator, movielens, both, events, got 'nope'" in result.output
    result = runner.invoke(app, ["experiment", "--through", "carrier-pigeon", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--through must be kafka or direct" in result.output
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "results.json").write_text("[]")
    result = runner.invoke(app, ["experiment", "--out", str(tmp_path / "used")])
    assert result.exit_code == 2 and "is not empty: pass a new --out directory" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_experiment_command_prints_its_table_and_writes_the_results(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "out"
    tiny = ["--world", "small", "--users", "150", "--items", "100", "--requests-per-day", "800", "--seeds", "2", "--first-seed", "5"]
    result = runner.invoke(app, ["experiment", "--data", "simulator", "--days", "2", "--through", "direct", "--out", str(out), *tiny])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["through"] == "direct"
    (data_set,) = results["data_sets"]
    assert data_set["data"] == "simulator/small" and data_set["worlds"] == 2 and data_set["ks"] == [50, 100]
    # the main arms and the baselines, each with its interval over the two seeds, as in the table
    arms = data_set["arms"]
    assert {"daily-full", "full+inc/1min", "popular/day", "popular/hour", "random"} <= set(arms)
    for name, arm in arms.items():
        recall = arm["intervals"]["recall@50"]
        assert recall["n"] == 2 and recall["low"] <= recall["mean"] <= recall["high"]
        assert len(arm["per_seed"]) == 2
        assert f"| {name} | {recall['mean']:.4f} ± " in result.stdout
    assert "full+inc/1min − daily-full" in result.stdout
    assert all((out / "simulator" / f"seed-{seed}" / "batches").is_dir() for seed in (5, 6))
