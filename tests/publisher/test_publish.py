from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from typing import NamedTuple

import numpy as np
import pytest
import torch
from freshtower.publisher.publish import Publisher, online_checkpoints
from freshtower.publisher.releases import ReleaseStore
from freshtower.publisher.serving import load_state
from freshtower.trainer.artifacts import full_models_dir, latest_full_model, load_full_model, save_full_model
from freshtower.trainer.online import OnlineTrainer, checkpoint_path

from freshtower.core.contracts import TrainingRecord
from freshtower.core.contracts.online_checkpoint import OnlineCheckpoint, read_online_checkpoint, write_online_checkpoint
from tests.publisher.conftest import DAY0, DAY1, publisher_settings


def train_online(settings, batches: int) -> OnlineTrainer:
    trainer = OnlineTrainer.start(settings)
    trainer.run(max_batches=batches, prefetch=False)  # checkpoints on the way out
    return trainer


def release_rows(release) -> dict[str, np.ndarray]:
    ids = json.loads(release.file("user_ids.json").read_text())
    vectors = np.load(release.file("user_embeddings.npy"))
    return {u: v for u, v in zip(ids, vectors) if u}


def copy_full_model(settings, day: str, *, recall_at_50=None, poison: bool = False, parent_recall_at_50=None, clicks=None):
    """Another full model for ``day``: the current one's weights (NaN in one
    MLP weight if ``poison``) with a chosen holdout Recall@50 in its
    manifest (and its parent's on the same clicks, and their number),
    written through the trainer's own artifact writer."""
    loaded = load_full_model(latest_full_model(full_models_dir(settings)))
    if poison:
        with torch.no_grad():
            loaded.model.user_tower.mlp[0].weight[3, 5] = float("nan")
    manifest = loaded.ref.manifest
    metrics = json.loads(json.dumps(manifest.metrics))
    if recall_at_50 is not None:
        metrics["exact"]["recall@50"] = recall_at_50
    if parent_recall_at_50 is not None:
        metrics["parent"] = {"version": loaded.ref.version, "exact": {"recall@50": parent_recall_at_50}}
    if clicks is not None:
        metrics["clicks"] = clicks
    record = TrainingRecord(
        parent=loaded.ref.version,
        from_scratch=False,
        data_start_ms=manifest.data_start_ms,
        data_end_ms=manifest.data_end_ms,
        newest_click_event_time_ms=manifest.newest_click_event_time_ms,
        holdout_start_ms=manifest.holdout_start_ms,
        holdout_end_ms=manifest.holdout_end_ms,
        metrics=metrics,
        lineage=manifest.lineage,
        config=manifest.config,
    )
    return save_full_model(full_models_dir(settings), day, loaded.model, loaded.estimator, {}, record)


def test_full_release_then_embeddings_releases_of_the_rows_changed_since(data_dir):
    settings = publisher_settings(data_dir)
    trainer = train_online(settings, 3)
    with Publisher(settings) as publisher:
        full, delta = publisher.tick(now_s=1000.0)
        assert (full.status, delta.status) == ("published", "published"), (full, delta)
        store = publisher.store
        full_release, delta_release = store.get(full.version), store.get(delta.version)
        assert store.active_version() == delta.version and delta_release.parent == full.version

        # The full release: every user row of the full model, its items, an exact index (300 items < 100k).
        model = load_full_model(latest_full_model(full_models_dir(settings))).model
        assert full_release.manifest.rows == {"user_embeddings": len(model.user_ids), "items": len(model.catalogue)}
        assert full_release.manifest.index.kind == "IndexFlatIP"
        # exact up to ties at the 100th score (float32 sums in another order): one item in 20,000 seen
        assert full_release.manifest.index.recall_at_100_vs_exact >= 0.999

        # The delta: exactly the rows the trainer changed (step > 0), with the checkpoint's values.
        checkpoint = read_online_checkpoint(checkpoint_path(settings))
        row_ids = checkpoint.user_ids.row_ids
        changed = {row_ids[r] for r in np.flatnonzero(checkpoint.row_updated_step.numpy() > 0)}
        rows = release_rows(delta_release)
        assert set(rows) == changed and len(changed) > 10
        for user_id in list(rows)[:20]:
            np.testing.assert_array_equal(rows[user_id], checkpoint.user_table[row_ids.index(user_id)].numpy())
        times = np.load(delta_release.file("row_event_time_ms.npy"))
        assert delta_release.manifest.newest_click_event_time_ms == int(times.max())
        assert delta_release.manifest.online_steps == {"checkpoint.pt": trainer.step}

        # More training: the next delta holds only the rows changed after the first one's step.
        first_step = trainer.step
        trainer = train_online(settings, 2)
        outcome = publisher.publish_delta_if_due(now_s=1000.0 + 30)
        assert outcome.status == "skipped" and "not due" in outcome.reason
        outcome = publisher.publish_delta_if_due(now_s=1000.0 + 60)
        assert outcome.status == "published"
        checkpoint = read_online_checkpoint(checkpoint_path(settings))
        row_ids = checkpoint.user_ids.row_ids
        expected = {row_ids[r] for r in np.flatnonzero(checkpoint.row_updated_step.numpy() > first_step)}
        assert set(release_rows(store.get(outcome.version))) == expected
        assert store.get(outcome.version).parent == delta.version

        # Nothing new: nothing to publish, whatever the clock says.
        outcome = publisher.publish_delta_if_due(now_s=10_000.0)
        assert outcome.status == "skipped" and "no user rows changed since the active release" in outcome.reason
        # The full model is not released twice.
        assert publisher.publish_full_if_new().status == "skipped"


def test_catalogues_above_the_threshold_get_an_hnsw_index_checked_against_exact_search(data_dir):
    settings = publisher_settings(
        data_dir, publisher={"exact_index_below": 100, "index_kinds": ["hnsw"], "hnsw_m": 8, "hnsw_ef_search": 200}
    )
    with Publisher(settings) as publisher:
        outcome = publisher.publish_full_if_new(now_s=0.0)
        index = publisher.store.get(outcome.version).manifest.index
    assert index.kind == "hnsw" and index.settings["hnsw_m"] == 8
    assert 0.9 <= index.recall_at_100_vs_exact <= 1.0 and index.check_queries == 200
    assert [c.kind for c in index.candidates] == ["hnsw"] and index.search_parameter == "efSearch"
    state = load_state(publisher.store, outcome.version, ef_search=150)
    assert state.index.index.hnsw.efSearch == 150


def test_event_clock_releases_when_event_time_has_moved_an_interval(data_dir):
    # Ten-minute batches, a 30-minute interval on the event clock.
    settings = publisher_settings(data_dir, publisher={"clock": "event", "publish_interval_seconds": 1800.0})
    train_online(settings, 1)
    with Publisher(settings) as publisher:
        assert [o.status for o in publisher.tick(now_s=0.0)] == ["published", "published"]  # full, then its first delta at once
        last = publisher.store.active().manifest.checkpoint_event_time_ms
        train_online(settings, 1)
        assert publisher.publish_delta_if_due(now_s=0.0).status == "skipped"  # 10 minutes of events: not due
        # The end of a replayed log: what was learnt goes out although not due.
        assert [o.status for o in publisher.tick(now_s=0.0, force_delta=True)] == ["skipped", "published"]
        last = publisher.store.active().manifest.checkpoint_event_time_ms
        train_online(settings, 4)  # three ten-minute windows may fall a few seconds short of 30 minutes of event time
        newest = read_online_checkpoint(checkpoint_path(settings)).newest_event_time_ms
        assert newest - last >= 1_800_000
        assert publisher.publish_delta_if_due(now_s=0.0).status == "published"  # wall time never moved


def test_a_full_model_without_holdout_clicks_is_not_refused_for_lacking_a_recall(data_dir):
    # The holdout is the next day's first minutes; for a stream's last day
    # it holds no click, so there is no figure to compare: not a drop.
    settings = publisher_settings(data_dir, publisher={"max_recall_drop": 0.02})
    with Publisher(settings) as publisher:
        publisher.tick(now_s=0.0)
        ref = copy_full_model(settings, DAY1)
        manifest = json.loads((ref.path / "manifest.json").read_text())
        manifest["metrics"] = {"users": 0, "clicks": 0, "items": manifest["metrics"]["items"]}  # what evaluate reports
        (ref.path / "manifest.json").write_text(json.dumps(manifest))
        outcome = publisher.publish_full_if_new()
        assert outcome.status == "published", outcome
        assert publisher.store.get(outcome.version).manifest.checks.holdout_recall_at_50 is None


@pytest.mark.parametrize("poison, recall_drop, status", [(True, 0.0, "refused"), (False, 0.10, "refused"), (False, 0.01, "published")])
def test_full_models_with_nan_or_a_recall_drop_beyond_the_margin_are_refused(data_dir, poison, recall_drop, status):
    settings = publisher_settings(data_dir, publisher={"max_recall_drop": 0.02, "min_gate_clicks": 0})
    with Publisher(settings) as publisher:
        first = publisher.tick(now_s=0.0)[0]
        active_recall = publisher.store.get(first.version).manifest.checks.holdout_recall_at_50
        assert active_recall > 0.1
        copy_full_model(settings, DAY1, recall_at_50=active_recall - recall_drop, poison=poison)
        outcome = publisher.publish_full_if_new()
        assert outcome.status == status, outcome
        if status == "refused":
            expected = (
                "user_tower.mlp.0.weight has 1 NaN/infinite" if poison else f"recall@50 {active_recall - recall_drop:.4f} is 0.1000 below"
            )
            assert expected in outcome.reason
            assert publisher.store.active_version() == first.version
            assert publisher.publish_full_if_new().status == "skipped"  # not retried by this process
        else:
            assert publisher.store.active_version() == outcome.version


@pytest.mark.parametrize(
    "parent_gap, clicks, status",
    [
        (0.01, 500, "published"),  # 0.10 below the active release's own holdout figure, 0.01 below its parent on the same clicks
        (0.10, 500, "refused"),  # 0.10 below its parent on the same clicks
        (0.10, 50, "published"),  # the same drop on a holdout of 50 clicks: too few to judge
    ],
)
def test_the_gate_compares_a_full_model_with_its_parent_on_the_same_holdout_clicks(data_dir, parent_gap, clicks, status):
    # Each day's holdout is another night's first minutes (few clicks, other users): a model is compared with
    # the served model scored on the model's own holdout clicks, not with that model's figure on its own day.
    settings = publisher_settings(data_dir, publisher={"max_recall_drop": 0.02, "min_gate_clicks": 200})
    with Publisher(settings) as publisher:
        first = publisher.tick(now_s=0.0)[0]
        manifest = publisher.store.get(first.version).manifest
        active_own = manifest.checks.holdout_recall_at_50
        assert active_own > 0.1 and manifest.model.version == f"{DAY0}.1"
        recall = round(active_own - 0.10, 4)  # an unpaired gate refuses this
        copy_full_model(settings, DAY1, recall_at_50=recall, parent_recall_at_50=recall + parent_gap, clicks=clicks)
        outcome = publisher.publish_full_if_new()
        assert outcome.status == status, outcome
        if status == "refused":
            assert f"{recall:.4f} is 0.1000 below its parent {DAY0}.1's {recall + parent_gap:.4f}" in outcome.reason
            assert publisher.store.active_version() == first.version
        else:
            checks = publisher.store.get(outcome.version).manifest.checks
            assert checks.baseline_recall_at_50 == recall + parent_gap and checks.holdout_clicks == clicks
            assert checks.baseline == f"parent {DAY0}.1 on the same {clicks} holdout clicks"


def test_the_online_trainer_keeps_following_the_served_model_when_a_newer_one_is_refused(data_dir):
    from freshtower.trainer.artifacts import full_models_dir, is_refused, latest_full_model
    from freshtower.trainer.online import OnlineTrainer

    settings = publisher_settings(data_dir, publisher={"min_gate_clicks": 0})
    with Publisher(settings) as publisher:
        publisher.tick(now_s=0.0)
        served_model = publisher.store.active().model_version
        copy_full_model(settings, DAY1, recall_at_50=0.0)
        assert publisher.publish_full_if_new().status == "refused"
        refused = latest_full_model(full_models_dir(settings))
        assert refused.version != served_model and is_refused(refused)
        train_online(settings, 2)  # does not re-base onto the refused model...
        assert OnlineTrainer.start(settings).base.version == served_model
        outcome = publisher.publish_delta_if_due(now_s=1e6)  # ...so embeddings keep flowing
        assert outcome.status == "published", outcome
        assert Publisher(settings).publish_full_if_new().status == "skipped"  # a new process does not retry it either


def test_rows_with_nan_are_refused_and_the_active_release_stays(data_dir):
    settings = publisher_settings(data_dir)
    train_online(settings, 2)
    with Publisher(settings) as publisher:
        publisher.publish_full_if_new()
        active = publisher.store.active_version()
        path = checkpoint_path(settings)
        checkpoint = torch.load(path, weights_only=True)
        changed = int(np.flatnonzero(checkpoint["row_updated_step"].numpy() > 0)[0])
        checkpoint["user_table"][changed, 7] = float("inf")
        torch.save(checkpoint, path)
        outcome = publisher.publish_delta_if_due(now_s=1e6)
        assert outcome.status == "refused" and "user_embeddings has 1 NaN/infinite value(s)" in outcome.reason
        assert publisher.store.active_version() == active and publisher.store.versions() == [active]


KILLED_PUBLISHER = textwrap.dedent(
    """
    import os, signal, sys
    from tests.publisher.conftest import publisher_settings
    from freshtower.publisher.publish import Publisher, online_checkpoints

    data_dir, kill_at = sys.argv[1], sys.argv[2]

    def on_stage(stage, detail):
        if kill_at in (stage, f"{stage}:{detail}"):
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no finally blocks

    with Publisher(publisher_settings(data_dir), on_stage=on_stage) as publisher:
        publisher.tick(now_s=1e9)
    """
)


class Released(NamedTuple):
    store: ReleaseStore
    active: str  # the active release
    files: dict[str, dict]  # version -> its manifest's files, for every release
    served: object  # what the service loads for ``active``


def released_with_more_to_come(settings) -> Released:
    """One published release, then what the next tick would release: rows
    trained since and a day-1 full model."""
    train_online(settings, 2)
    with Publisher(settings) as publisher:
        publisher.tick(now_s=0.0)
    store = ReleaseStore(settings.releases_dir)
    active = store.active_version()
    released = Released(store, active, {r.version: r.manifest.files for r in store.list()}, load_state(store, active))
    train_online(settings, 2)  # rows for an embeddings release
    copy_full_model(settings, DAY1)  # and a full model for a full release
    return released


@pytest.mark.slow
def test_a_publisher_killed_mid_release_leaves_the_previous_release_active_and_intact(data_dir):
    settings = publisher_settings(data_dir)
    store, active, before, served = released_with_more_to_come(settings)

    def killed_at(kill_at: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        result = subprocess.run([sys.executable, "-c", KILLED_PUBLISHER, str(data_dir), kill_at], env=env, capture_output=True, timeout=120)
        assert result.returncode == -9, result.stderr.decode()[-2000:]
        assert store.active_version() == active  # the pointer never moved
        for version in store.chain(active):
            store.verify(version.version)  # every file of the active chain still matches its checksum
        assert {v: store.get(v).manifest.files for v in before} == before
        state = load_state(store, active)
        np.testing.assert_array_equal(state.id_table, served.id_table)

    killed_at("file:item_vectors.npy")  # half-way through writing the full release
    assert any(p.name.startswith(".staging-") for p in store.root.iterdir())
    killed_at("sealed")  # the full release is complete on disk, the pointer not yet moved
    orphans = [v for v in store.versions() if v not in before]
    assert len(orphans) == 1 and orphans[0].endswith("-full")

    with Publisher(settings) as publisher:  # the next publisher clears what was left and carries on
        assert orphans[0] not in store.versions()
        assert not any(p.name.startswith(".staging-") for p in store.root.iterdir())
        full, delta = publisher.tick(now_s=1e9)
        assert full.status == "published" and store.get(full.version).model_version == f"{DAY1}.1"
        assert delta.status == "skipped"  # the online trainer still follows the day-0 model
        train_online(settings, 1)  # re-bases onto the new full model
        delta = publisher.publish_delta_if_due(now_s=1e9)
        assert delta.status == "published" and store.active_version() == delta.version


def split_checkpoint(checkpoint: OnlineCheckpoint, owner: np.ndarray, partition: int) -> OnlineCheckpoint:
    """The checkpoint one of two user-partitioned trainers would hold: rows
    it does not own look untouched (step 0), as in a trainer that never saw them."""
    steps = checkpoint.row_updated_step.clone()
    steps[torch.from_numpy(owner != partition)] = 0
    return dataclasses.replace(checkpoint, row_updated_step=steps)


def test_checkpoints_of_user_partitions_are_released_together_each_from_its_own_step(data_dir):
    settings = publisher_settings(data_dir)
    train_online(settings, 3)
    single = checkpoint_path(settings)
    checkpoint = read_online_checkpoint(single)
    rows = len(checkpoint.user_ids.row_ids)
    owner = np.arange(rows) % 2  # user partition of each row
    for k in (0, 1):
        write_online_checkpoint(settings.online_dir / f"checkpoint-{k}-of-2.pt", split_checkpoint(checkpoint, owner, k))
    # the single checkpoint left from before scaling out is ignored: were it read, its rows would clash
    assert sorted(online_checkpoints(settings.online_dir)) == ["checkpoint-0-of-2.pt", "checkpoint-1-of-2.pt"]
    with Publisher(settings) as publisher:
        full, delta = publisher.tick(now_s=0.0)
        assert delta.status == "published", delta
        release = publisher.store.get(delta.version)
        row_ids = checkpoint.user_ids.row_ids
        changed = {row_ids[r] for r in np.flatnonzero(checkpoint.row_updated_step.numpy() > 0)}
        assert set(release_rows(release)) == changed  # the union of both partitions
        step = checkpoint.step
        assert release.manifest.online_steps == {"checkpoint-0-of-2.pt": step, "checkpoint-1-of-2.pt": step}

        # Partition 1 trains on (one more step, two of its rows); partition 0 does not move.
        moved = read_online_checkpoint(settings.online_dir / "checkpoint-1-of-2.pt")
        mine = np.flatnonzero((owner == 1) & (np.arange(rows) > 0))[:2]
        moved = dataclasses.replace(moved, step=step + 1)
        moved.row_updated_step[torch.from_numpy(mine)] = step + 1
        moved.user_table[torch.from_numpy(mine)] += 0.5
        write_online_checkpoint(settings.online_dir / "checkpoint-1-of-2.pt", moved)
        second = publisher.publish_delta_if_due(now_s=1e6)
        assert second.status == "published" and second.rows == 2
        assert set(release_rows(publisher.store.get(second.version))) == {row_ids[r] for r in mine}
        assert publisher.store.get(second.version).manifest.online_steps["checkpoint-1-of-2.pt"] == step + 1


class CountingPublisher(Publisher):
    """A publisher that counts its ticks."""

    ticks = 0

    def tick(self, *args, **kwargs):
        self.ticks += 1
        return super().tick(*args, **kwargs)


def test_a_millisecond_publish_interval_does_not_make_the_publisher_spin(data_dir):
    """A release after every checkpoint (the seconds mode) must not turn the
    wait between ticks into the interval: each tick reads every checkpoint."""
    settings = publisher_settings(data_dir, publisher={"publish_interval_seconds": 0.001, "poll_seconds": 10.0})
    train_online(settings, 2)
    stop_at = time.monotonic() + 1.5
    with CountingPublisher(settings) as publisher:
        published = publisher.run(should_stop=lambda: time.monotonic() > stop_at)
    assert published == 2  # the full release, and at once the rows trained on it
    assert publisher.ticks <= 2, f"{publisher.ticks} ticks in 1.5 s with nothing new to release"
