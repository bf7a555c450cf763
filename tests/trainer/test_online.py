from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from freshtower.trainer.full import train_full
from freshtower.trainer.online import MissingModelError, OnlineTrainer

from freshtower.core.batches import list_batches, read_batch
from tests.conftest import make_settings

DAY0, DAY1 = "2026-11-20", "2026-11-21"


@pytest.fixture(scope="module")
def day0_model_dir(tmp_path_factory, simulated_batches):
    """A data directory with the simulated batches and a day-0 full model."""
    data_dir = tmp_path_factory.mktemp("online") / "data"
    shutil.copytree(simulated_batches, data_dir / "batches")
    train_full(make_settings(data_dir), DAY0)
    return data_dir


@pytest.fixture
def data_dir(tmp_path, day0_model_dir):
    copy = tmp_path / "data"
    shutil.copytree(day0_model_dir, copy)
    return copy


def test_only_user_id_rows_in_the_batch_change(data_dir):
    trainer = OnlineTrainer.start(make_settings(data_dir))
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    table_before = model.user_tower.id_embedding.detach().clone()
    ref = trainer.pending()[0]
    trainer.learn_batch(ref)

    for name, param in model.named_parameters():
        if name != "user_tower.id_embedding":
            assert torch.equal(param, before[name]), f"{name} changed"  # bit-identical
    batch_users = set(read_batch(ref, trainer.spec).user_ids)
    rows_in_batch = set(model.user_ids.lookup(sorted(batch_users)).tolist()) - {0}
    table = model.user_tower.id_embedding.detach()
    old_rows = table_before.shape[0]
    changed = set(torch.nonzero((table[:old_rows] != table_before).any(dim=1)).flatten().tolist())
    assert changed and changed <= rows_in_batch
    assert torch.equal(table[0], table_before[0])  # the cold-start row never moves online


def test_restart_resumes_without_repeating_or_skipping_a_batch(data_dir, tmp_path):
    other = tmp_path / "uninterrupted"
    shutil.copytree(data_dir, other)
    straight = OnlineTrainer.start(make_settings(other))
    straight.run(max_batches=10, prefetch=False)

    settings = make_settings(data_dir)
    first = OnlineTrainer.start(settings)
    first.run(max_batches=4, prefetch=False)  # checkpoints on the way out
    resumed = OnlineTrainer.start(settings)
    assert resumed.next_window_ms == first.next_window_ms and resumed.step == first.step
    resumed.run(max_batches=6, prefetch=False)
    assert resumed.stats.batches == 6
    assert resumed.next_window_ms == straight.next_window_ms
    assert torch.equal(resumed.model.user_tower.id_embedding[: len(resumed.model.user_ids)],
                       straight.model.user_tower.id_embedding[: len(straight.model.user_ids)])
    with pytest.raises(ValueError, match="twice"):
        resumed.learn_batch(list_batches(settings.batches_dir)[0])


def test_rows_changed_since_a_step_are_tracked_with_their_event_time(data_dir):
    trainer = OnlineTrainer.start(make_settings(data_dir))
    first, second = trainer.pending()[:2]
    trainer.learn_batch(first)
    step_after_first = trainer.step
    trainer.learn_batch(second)
    changed = np.flatnonzero(trainer.row_updated_step > step_after_first)
    second_users = set(read_batch(second, trainer.spec).user_ids)
    assert changed.size and {trainer.model.user_ids.id_of(r) for r in changed} <= second_users
    assert np.all(trainer.row_event_time_ms[changed] >= second.window_start_ms)
    assert np.all(trainer.row_event_time_ms[changed] <= second.manifest.max_event_time_ms)


def test_a_new_full_model_is_rebased_onto_and_caught_up_from(data_dir):
    settings = make_settings(data_dir)
    trainer = OnlineTrainer.start(settings)
    assert trainer.base.version == f"{DAY0}.1"
    trainer.run(max_batches=30, prefetch=False)
    newer = train_full(settings, DAY1).ref
    assert trainer.rebase_if_newer()
    assert trainer.base.version == newer.version
    assert trainer.next_window_ms == newer.data_end_ms  # catches up from where the model's data ended
    assert trainer.pending()[0].window_start_ms == newer.data_end_ms
    assert not trainer.rebase_if_newer()
    # A restart now resumes on the new base, not the old checkpoint.
    assert OnlineTrainer.start(settings).base.version == newer.version


def test_starting_without_a_full_model_says_what_to_do(tmp_path):
    with pytest.raises(MissingModelError, match="freshtower train full"):
        OnlineTrainer.start(make_settings(tmp_path))


def test_background_decoding_gives_the_same_result(data_dir, tmp_path):
    other = tmp_path / "inline"
    shutil.copytree(data_dir, other)
    background = OnlineTrainer.start(make_settings(data_dir))
    background.run(max_batches=5, prefetch=True)
    inline = OnlineTrainer.start(make_settings(other))
    inline.run(max_batches=5, prefetch=False)
    assert torch.equal(background.model.user_tower.id_embedding, inline.model.user_tower.id_embedding)


def test_several_files_per_window_and_late_files_are_each_trained_once(data_dir):
    import json

    settings = make_settings(data_dir)
    trainer = OnlineTrainer.start(settings)
    first, second, third = trainer.pending()[:3]
    trainer.learn_batch(first)
    trainer.learn_batch(third)  # a newer window first...
    assert trainer.pending()[0].window_start_ms == second.window_start_ms  # ...the older one stays pending
    # A second streams worker's file for the first window lands late.
    stem = first.manifest_path.stem + "-w1"
    first.path.with_name(stem + ".tfrecord").write_bytes(first.path.read_bytes())
    manifest = json.loads(first.manifest_path.read_text())
    manifest["file"] = stem + ".tfrecord"
    first.manifest_path.with_name(stem + ".json").write_text(json.dumps(manifest))
    pending = trainer.pending()
    assert [r.manifest_path.stem for r in pending[:2]] == [stem, second.manifest_path.stem]
    trainer.learn_batch(pending[0])
    trainer.learn_batch(second)
    with pytest.raises(ValueError, match="twice"):
        trainer.learn_batch(first)
    trainer.checkpoint()
    resumed = OnlineTrainer.start(settings)
    assert resumed.trained_recent == trainer.trained_recent
    assert batch_keys(resumed.pending()) == batch_keys(trainer.pending())


def batch_keys(refs):
    from freshtower.trainer.online import batch_key

    return [batch_key(r) for r in refs]


def test_partitioned_trainers_split_the_users(data_dir):
    from freshtower.trainer.online import Partition, checkpoint_path

    settings = make_settings(data_dir, training={"positive_resampling": {"enabled": False}})
    halves = [OnlineTrainer.start(settings, Partition(k, 2)) for k in range(2)]
    ref = halves[0].pending()[0]
    changed = []
    for trainer in halves:
        before = trainer.model.user_tower.id_embedding.detach().clone()
        trainer.learn_batch(ref)
        after = trainer.model.user_tower.id_embedding.detach()[: before.shape[0]]
        rows = torch.nonzero((after != before).any(dim=1)).flatten().tolist()
        changed.append({trainer.model.user_ids.id_of(r) for r in rows})
        trainer.checkpoint()
        assert checkpoint_path(settings, trainer.partition).is_file()
    assert changed[0] and changed[1] and not changed[0] & changed[1]
    whole = OnlineTrainer.start(settings)
    whole.learn_batch(ref)
    assert whole.stats.samples == halves[0].stats.samples + halves[1].stats.samples
    with pytest.raises(ValueError):
        Partition(2, 2)


def test_a_windows_part_files_count_at_that_windows_start():
    # The streams worker writes one file per input partition: <HHMMSS>-p<k>.
    minute_one = 1_795_132_860_000  # 2026-11-20 00:01:00 UTC
    assert OnlineTrainer._window_of("2026-11-20/000100-p3") == OnlineTrainer._window_of("2026-11-20/000100") == minute_one


def test_a_caught_up_follower_checkpoints_its_last_batches_without_waiting_for_a_new_one(data_dir):
    import time
    from dataclasses import asdict

    from freshtower.trainer.online import checkpoint_path

    from freshtower.core.contracts.online_checkpoint import read_online_checkpoint

    settings = make_settings(data_dir, training={"checkpoint_every_seconds": 0.2})
    trainer = OnlineTrainer.start(settings)
    for ref in trainer.pending()[8:]:
        ref.manifest_path.unlink()  # a short stream: eight batches, then quiet
    batches = len(trainer.pending())
    assert batches == 8
    path = checkpoint_path(settings)
    deadline = time.monotonic() + 60
    seen = {}

    def saved_everything() -> bool:
        # Polled while following: stop once the checkpoint on disk holds every batch.
        if path.is_file() and trainer.stats.batches == batches:
            seen.update(asdict(read_online_checkpoint(path).stats))
            return seen["batches"] == batches
        return time.monotonic() > deadline

    trainer.run(follow=True, poll_seconds=0.05, should_stop=saved_everything, prefetch=False)
    assert seen.get("batches") == batches and seen["samples"] == trainer.stats.samples > 0
