from __future__ import annotations

import json

from typer.testing import CliRunner

from freshtower.app.cli import app
from freshtower.app.simulator import Simulator, SimulatorConfig
from tests.streams.conftest import settings_env, streams_settings

runner = CliRunner()


def test_streams_and_replay_have_help():
    for args in (["streams", "--help"], ["replay", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_replay_command_reports_counts_per_topic(kafka_broker, tmp_path):
    path = tmp_path / "events.jsonl"
    counts = Simulator(SimulatorConfig(users=20, items=20, requests_per_day=40, seed=8)).write_events(path, [0])
    settings = streams_settings(kafka_broker.bootstrap, tmp_path / "data")
    env = {k: v for k, v in settings_env(settings).items() if k.startswith("FRESHTOWER_")}
    result = runner.invoke(app, ["replay", str(path), "--speedup", "0"], env=env)
    assert result.exit_code == 0, result.output
    t = settings.topics
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        t.impressions: counts["impressions"],
        t.clicks: counts["clicks"],
        t.rank_logs: counts["rank-logs"],
    }


def test_replay_of_a_bad_file_fails_with_the_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("{oops\n")
    result = runner.invoke(app, ["replay", str(path)], env={"FRESHTOWER_KAFKA": "127.0.0.1:1"})
    assert result.exit_code == 1
    assert "events.jsonl:1" in result.output
