"""The trainers' writes on a real full disk (a size-limited tmpfs): the
online trainer's checkpoint and the daily trainer's full model stop with
the file named, the previous one stays whole, and training resumes at the
right position once space returns."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from freshtower.trainer.artifacts import full_models_dir, latest_full_model, load_full_model, save_full_model
from freshtower.trainer.online import OnlineTrainer, checkpoint_path

from freshtower.core.contracts import TrainingRecord
from freshtower.core.contracts.online_checkpoint import read_online_checkpoint
from freshtower.core.storage import StorageError
from tests.conftest import DAY1, make_settings
from tests.storage_faults import tree_bytes



def on_small_disk(small_disk, source: Path):
    """A copy of ``source`` on a tmpfs with room for a few more checkpoints."""
    disk = small_disk(tree_bytes(source) + (64 << 20))
    shutil.copytree(source, disk.path / "data")
    return disk, make_settings(disk.path / "data")


def user_rows(trainer: OnlineTrainer) -> torch.Tensor:
    return trainer.model.user_tower.id_embedding[: len(trainer.model.user_ids)]


def test_an_online_checkpoint_on_a_full_disk_stops_naming_the_file_and_training_resumes_where_it_was(
    day0_model_dir, tmp_path, small_disk
):
    shutil.copytree(day0_model_dir, tmp_path / "straight")
    straight = OnlineTrainer.start(make_settings(tmp_path / "straight"))
    straight.run(max_batches=10, prefetch=False)

    disk, settings = on_small_disk(small_disk, day0_model_dir)
    first = OnlineTrainer.start(settings)
    first.run(max_batches=4, prefetch=False)  # checkpoints on the way out
    path = checkpoint_path(settings)
    saved = read_online_checkpoint(path)
    second = OnlineTrainer.start(settings)
    disk.fill()
    with pytest.raises(StorageError) as caught:
        second.run(max_batches=3, prefetch=False)
    assert str(caught.value).startswith(f"cannot write {path}: No space left on device"), str(caught.value)
    kept = read_online_checkpoint(path)  # the previous checkpoint is whole and unchanged
    assert (kept.step, kept.next_window_ms) == (saved.step, saved.next_window_ms) == (first.step, first.next_window_ms)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    disk.free()
    resumed = OnlineTrainer.start(settings)  # as a process manager would start it again
    assert (resumed.step, resumed.next_window_ms) == (first.step, first.next_window_ms)
    resumed.run(max_batches=6, prefetch=False)  # the 3 batches trained before the failure are trained again, once
    assert resumed.stats.batches == 6 and resumed.next_window_ms == straight.next_window_ms
    assert torch.equal(user_rows(resumed), user_rows(straight))


def test_a_full_model_on_a_full_disk_stops_naming_the_file_and_latest_stays(day0_model_dir, small_disk):
    disk, settings = on_small_disk(small_disk, day0_model_dir)
    models = full_models_dir(settings)
    latest = latest_full_model(models)
    loaded = load_full_model(latest)
    manifest = loaded.ref.manifest
    record = TrainingRecord(**{name: getattr(manifest, name) for name in TrainingRecord.__dataclass_fields__ if hasattr(manifest, name)})
    disk.fill()
    with pytest.raises(StorageError) as caught:
        save_full_model(models, DAY1, loaded.model, loaded.estimator, {}, record)
    assert f"cannot write {models}" in str(caught.value) and "No space left on device" in str(caught.value), str(caught.value)
    assert latest_full_model(models).version == latest.version
    assert not [p for p in models.iterdir() if p.name.startswith(".staging")]  # the staging directory is gone
    disk.free()
    saved = save_full_model(models, DAY1, loaded.model, loaded.estimator, {}, record)
    assert latest_full_model(models).version == saved.version == f"{DAY1}.1"
