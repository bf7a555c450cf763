"""The publisher's decision as a pure function: hand-made active releases and
checkpoints in, what is due and why out."""

from __future__ import annotations

import dataclasses

import torch
from freshtower.publisher.due import embeddings_release_due, full_release_due, what_is_due

from freshtower.core.contracts import VocabularyState
from freshtower.core.settings import PublisherConfig
from tests.core.test_contracts import embeddings_release_manifest, full_release_manifest, online_checkpoint

WALL = PublisherConfig(clock="wall", publish_interval_seconds=600.0)
EVENT = PublisherConfig(clock="event", publish_interval_seconds=600.0)


def checkpoint(base: str = "2026-11-21.2", step: int = 9, updated=(0, 9, 0, 4), newest_ms: int = 1_795_295_170_000):
    # rows: 0 is the default row, 2 is free (""); 1 and 3 are users u1, u3
    return dataclasses.replace(
        online_checkpoint(),
        base_version=base,
        step=step,
        row_updated_step=torch.tensor(updated),
        newest_event_time_ms=newest_ms,
        user_ids=VocabularyState(min_count=1, expiry_days=30, row_ids=["", "u1", "", "u3"], last_seen=[0] * 4, pending_ids=[], pending=[]),
    )


def test_after_a_full_release_the_changed_rows_are_due_at_once():
    active = full_release_manifest()  # model 2026-11-21.2, every checkpoint at step 0
    due = embeddings_release_due(active, {"checkpoint.pt": checkpoint()}, now_s=active.created_at, config=WALL)
    # rows updated after step 0: 1 (step 9) and 3 (step 4)
    assert due.scheduled and due.due and due.rows == 2 and due.taken["checkpoint.pt"].rows.tolist() == [1, 3]
    assert due.reason == "2 user rows changed since the active release 00000003-full"


def test_on_the_wall_clock_a_delta_is_due_an_interval_after_the_active_one():
    active = dataclasses.replace(embeddings_release_manifest(), online_steps={"checkpoint.pt": 4})
    checkpoints = {"checkpoint.pt": checkpoint()}  # row 1 changed at step 9 > 4; row 3 at 4 is released
    early = embeddings_release_due(active, checkpoints, now_s=active.created_at + 599, config=WALL)
    assert not early.scheduled and not early.due and early.rows == 1
    assert early.reason == "not due (wall clock, every 600 s)"
    late = embeddings_release_due(active, checkpoints, now_s=active.created_at + 600, config=WALL)
    assert late.due and late.taken["checkpoint.pt"].since == 4 and late.taken["checkpoint.pt"].rows.tolist() == [1]


def test_on_the_event_clock_the_newest_checkpoint_decides():
    active = embeddings_release_manifest()  # the trainers had learnt up to 1_795_296_800_000 ms
    behind = checkpoint(newest_ms=1_795_296_800_000 + 599_000)
    ahead = checkpoint(newest_ms=1_795_296_800_000 + 600_000)
    names = {"checkpoint-0-of-2.pt": behind}
    assert not embeddings_release_due(active, names, now_s=0.0, config=EVENT).scheduled
    names["checkpoint-1-of-2.pt"] = ahead  # 600 s of event time past the active release: due, wall time never moved
    due = embeddings_release_due(active, names, now_s=0.0, config=EVENT)
    assert due.scheduled and sorted(due.taken) == ["checkpoint-0-of-2.pt", "checkpoint-1-of-2.pt"]


def test_nothing_changed_is_scheduled_but_not_due():
    active = dataclasses.replace(embeddings_release_manifest(), online_steps={"checkpoint.pt": 9})
    due = embeddings_release_due(active, {"checkpoint.pt": checkpoint()}, now_s=active.created_at + 1e6, config=WALL)
    assert due.scheduled and due.rows == 0 and not due.due
    assert due.reason.startswith("no user rows changed since the active release")


def test_a_restarted_trainer_sends_every_row_again():
    active = dataclasses.replace(embeddings_release_manifest(), online_steps={"checkpoint.pt": 20})
    due = embeddings_release_due(active, {"checkpoint.pt": checkpoint(step=3)}, now_s=active.created_at + 1e6, config=WALL)
    # step 3 < 20: a resync, every user row (never row 0 nor a free row)
    assert due.taken["checkpoint.pt"].resync and due.taken["checkpoint.pt"].rows.tolist() == [1, 3]


def test_checkpoints_of_another_full_model_are_not_taken():
    active = full_release_manifest()
    due = embeddings_release_due(active, {"checkpoint.pt": checkpoint(base="2026-11-22.1")}, now_s=0.0, config=WALL)
    assert not due.due and due.taken == {} and due.elsewhere == ("checkpoint.pt follows full model 2026-11-22.1",)
    assert "the active release 00000003-full serves 2026-11-21.2; no embeddings release until they match" in due.reason
    assert embeddings_release_due(None, {"checkpoint.pt": checkpoint()}, now_s=0.0, config=WALL).reason.startswith("no active release")
    assert embeddings_release_due(active, {}, now_s=0.0, config=WALL).reason == "no online checkpoint"


def test_a_full_model_is_due_until_released_or_refused():
    released = [{"version": "00000003-full", "kind": "full", "model_version": "2026-11-21.2"}]
    assert full_release_due("2026-11-22.1", activations=released, refused=None).due
    assert not full_release_due("2026-11-21.2", activations=released, refused=None).due
    refused = full_release_due("2026-11-22.1", activations=released, refused="recall@50 dropped")
    assert not refused.due and refused.reason == "full model 2026-11-22.1 was refused: recall@50 dropped"
    assert not full_release_due(None, activations=[], refused=None).due


def test_what_is_due_puts_both_decisions_together():
    active = full_release_manifest()
    due = what_is_due(
        model_version="2026-11-21.2",
        model_refused=None,
        activations=[{"version": active.version, "kind": "full", "model_version": "2026-11-21.2"}],
        active=active,
        checkpoints={"checkpoint.pt": checkpoint()},
        now_s=active.created_at,
        config=WALL,
    )
    assert not due.full.due and due.embeddings.due and due.embeddings.rows == 2
