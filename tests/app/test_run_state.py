"""``freshtower run``'s pure parts: the completion rule, the status line,
the summary text, the settings the parts get, and stopping children."""

from __future__ import annotations

import os
import sys
import time

import pytest
from freshtower.streams.replay import load_event_log

from freshtower.app.event_log import SimulatedLog
from freshtower.app.pipeline import run_settings
from freshtower.app.processes import ChildProcess, stop_all
from freshtower.app.run_state import ActiveRelease, Observation, RunSummary, Settled, render_summary, status_line, unfinished
from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.app.supervisor import child_environment
from freshtower.core.settings import load_settings
from tests.conftest import running_in_group

LAST_EVENT = 1_795_392_000_000  # 2026-11-23 00:00 UTC
DONE_AT = LAST_EVENT + 2_110_000  # + join window 1800 s + window 300 s + lateness 10 s
ACTIVE = ActiveRelease("00000005-embeddings", "embeddings", "2026-11-22.1", LAST_EVENT - 60_000, LAST_EVENT - 60_000)


def settled(**changes) -> Settled:
    facts = {
        "streams_done_ms": DONE_AT,
        "newest_batch_start_ms": LAST_EVENT + 1_800_000,
        "days_due": (),
        "servable_model": "2026-11-22.1",
        "servable_model_handled": True,
        "checkpoint_base": "2026-11-22.1",
        "checkpoint_newest_window_ms": LAST_EVENT + 1_800_000,
        "rows_pending": 0,
        "rows_pending_due": False,
        "serving": ACTIVE.version,
    }
    return Settled(**(facts | changes))


def observation(settled_facts: Settled | None = None, **changes) -> Observation:
    facts = {
        "elapsed_seconds": 75.0,
        "events_sent": 1000,
        "events_total": 1000,
        "events_total_known": True,
        "replay_finished": True,
        "newest_event_ms": LAST_EVENT,
        "worker": {"ready": True, "events_in": 1000, "watermark_ms": DONE_AT, "open_requests": 0, "batches": 12},
        "full_models": ("2026-11-21.1", "2026-11-22.1"),
        "releases_full": 2,
        "releases_embeddings": 3,
        "active": ACTIVE,
        "parts_alive": 6,
        "parts_total": 6,
        "settled": settled() if settled_facts is None else settled_facts,
    }
    return Observation(**(facts | changes))


def test_a_run_is_complete_when_every_part_has_finished_its_share():
    assert unfinished(observation()) is None


@pytest.mark.parametrize(
    "obs, part, why",
    [
        (observation(replay_finished=False, events_sent=10), "replay", "10 of 1,000 events sent"),
        (observation(worker=None), "streams", "does not answer"),
        (observation(worker={"ready": True, "events_in": 999, "watermark_ms": DONE_AT, "open_requests": 0}), "streams", "read 999"),
        (observation(worker={"ready": True, "events_in": 1000, "watermark_ms": DONE_AT - 1, "open_requests": 0}), "streams", "watermark"),
        (observation(worker={"ready": True, "events_in": 1000, "watermark_ms": DONE_AT, "open_requests": 3}), "streams", "3 requests"),
        (observation(settled(days_due=("2026-11-22",))), "train-daily", "2026-11-22 not trained"),
        (observation(settled(checkpoint_base="2026-11-21.1")), "train-online", "follows 2026-11-21.1"),
        (observation(settled(checkpoint_newest_window_ms=LAST_EVENT)), "train-online", "holds batches up to"),
        (observation(settled(servable_model_handled=False)), "publish", "not released"),
        (observation(settled(rows_pending=7, rows_pending_due=True)), "publish", "7 changed user rows are due"),
        (observation(settled(serving="00000004-embeddings")), "serve", "serves 00000004-embeddings"),
    ],
)
def test_the_first_part_that_has_not_finished_is_named(obs, part, why):
    found = unfinished(obs)
    assert found is not None and found[0] == part and why in found[1]


def test_a_restarted_worker_is_done_by_its_watermark_not_by_its_count_since_the_restart():
    # started again, it reads from the committed offsets: 400 events since then
    restarted = {"ready": True, "events_in": 400, "watermark_ms": DONE_AT, "open_requests": 0}
    assert unfinished(observation(worker=restarted, streams_restarts=1)) is None
    assert unfinished(observation(worker=restarted))[0] == "streams"
    behind = {**restarted, "watermark_ms": DONE_AT - 1}
    assert unfinished(observation(worker=behind, streams_restarts=1))[0] == "streams"


def test_rows_the_event_clock_holds_back_do_not_block_completion():
    # Not due: the pipeline releases them with one forced tick at the end.
    assert unfinished(observation(settled(rows_pending=7, rows_pending_due=False))) is None


def test_status_line_shows_progress_and_freshness_in_event_time():
    line = status_line(observation(events_sent=500, events_total_known=False))
    # freshness: newest event replayed minus the newest click served = 60 s
    assert "events 500/1,000+ (2026-11-23 00:00)" in line and "batches 12" in line and "full models 2" in line
    assert "releases 2 full + 3 embeddings" in line and "freshness 60 s" in line and "parts 6/6 up" in line


def test_the_summary_names_what_was_learnt_and_published():
    summary = RunSummary(
        source="2 simulated days",
        wall_seconds=200,
        replay_seconds=120,
        speedup=1440,
        events_by_topic={"clicks": 7, "impressions": 3},
        last_event_ms=LAST_EVENT,
        worker={"dead_letters": 1, "counters": {"dead_letters.bad_id": 1}, "join_hit_rate": 1.0},
        batches=12,
        batch_days={"2026-11-22": 12},
        records=40,
        positives=7,
        window_seconds=300,
        full_models=[],
        online={"samples": 99, "batches": 12, "rebases": 1, "base": "2026-11-22.1"},
        releases_full=2,
        releases_embeddings=3,
        active=ACTIVE,
        rows_not_due=0,
        recall=None,
    )
    text = "\n".join(render_summary(summary))
    assert "10 events replayed in 2m 00s (speed-up 1,440: a day in 1m 00s); whole run 3m 20s" in text
    assert "dead letters 1 (bad_id 1)" in text and "12 of 300 s (2026-11-22 12); 40 records, 7 clicked" in text
    assert "99 samples from 12 batches, 1 re-bases" in text
    assert "active 00000005-embeddings (model 2026-11-22.1)" in text and "60 event-time s before the last event" in text


def test_parts_get_the_run_choices_only_where_the_user_set_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_STREAMS__WINDOW_SECONDS", "60")
    user = load_settings(data_dir=tmp_path, training={"mode": "pairwise"})
    settings = run_settings(user, bootstrap="127.0.0.1:1", streams_web_port=2, service_port=3, speedup=1440)
    assert settings.streams.window_seconds == 60  # the user's
    assert settings.streams.idle_advance_rate == 1440 and settings.streams.allowed_lateness_seconds == 720
    assert settings.streams.max_future_seconds == 7200  # five wall seconds of a stalled partition
    assert settings.training.mode == "pairwise" and settings.training.full_clock == "event" and settings.publisher.clock == "event"
    assert (settings.kafka, settings.streams.web_port, settings.service.port) == ("127.0.0.1:1", 2, 3)


def test_the_child_environment_reproduces_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FRESHTOWER_TRAINING__MODE", "pairwise")  # replaced by the whole section
    user = load_settings(data_dir=tmp_path, service={"admin_token": "secret"})
    settings = run_settings(user, bootstrap="127.0.0.1:1", streams_web_port=2, service_port=3, speedup=0)
    assert settings.streams.max_future_seconds == 3600  # as fast as possible: a sparse partition's quiet spells
    env = child_environment(settings, os.environ)
    for key in [k for k in os.environ if k.startswith("FRESHTOWER_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("FRESHTOWER_"):
            monkeypatch.setenv(key, value)
    assert load_settings() == settings


def test_stop_all_kills_a_part_that_ignores_sigterm_and_its_helpers(tmp_path):
    # A shell that ignores SIGTERM, with a helper process in its group; it
    # says when the trap is set (a SIGTERM before that would end it at once).
    script = "trap '' TERM; echo trapped; sleep 60 & sleep 60"
    child = ChildProcess("stubborn", ["sh", "-c", script], dict(os.environ), tmp_path / "stubborn.log").start()
    deadline = time.monotonic() + 10
    while child.log_tail() != ["trapped"]:
        assert time.monotonic() < deadline, "the shell did not set its trap within 10 s"
        time.sleep(0.05)
    started = time.monotonic()
    ended = stop_all([child], timeout=1.0)
    assert "killed after 1 s" in ended["stubborn"] and time.monotonic() - started < 20
    # the helper went with it: stop_all returns only once the group is empty
    assert running_in_group(child.pid) == []


def test_simulated_log_hands_over_days_in_event_time_order_and_writes_the_log(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    simulator = Simulator(SimulatorConfig(users=40, items=30, requests_per_day=150, seed=4))
    log = SimulatedLog(simulator, 2, tmp_path / "events.jsonl", settings).start()
    replayed = list(log)
    times = [e.ts for e in replayed]
    assert log.complete and times == sorted(times) and replayed == log.events
    assert [(e.ts, e.topic, e.key, e.value) for e in load_event_log(log.path, settings)] == [tuple(e) for e in replayed]


def test_a_child_exit_code_and_log_tail_are_kept(tmp_path):
    child = ChildProcess(
        "failing", [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], dict(os.environ), tmp_path / "f.log"
    )
    child.start().process.wait(30)
    assert child.returncode == 3 and not child.alive and child.log_tail() == ["about to fail"]
