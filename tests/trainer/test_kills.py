"""The trainers SIGKILLed at a seeded random moment and started again, as a
process manager would: the online trainer while it writes a checkpoint,
the daily trainer mid training. Each resumes at the right position: no
batch trained twice or skipped, no half-written file ever read."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from freshtower.trainer.artifacts import full_models_dir, latest_full_model, load_full_model
from freshtower.trainer.full import train_full
from freshtower.trainer.online import OnlineTrainer, checkpoint_path

from freshtower.core.contracts.online_checkpoint import read_online_checkpoint
from tests.conftest import DAY0, DAY1, make_settings

pytestmark = pytest.mark.slow

BATCHES = 10


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.getcwd()}


def user_rows(trainer: OnlineTrainer) -> torch.Tensor:
    return trainer.model.user_tower.id_embedding[: len(trainer.model.user_ids)]


# A checkpoint after every batch; the ``kill_at``-th one is cut off after
# ``fraction`` of its bytes by SIGKILL (no clean-up, no finally blocks).
KILLED_ONLINE_TRAINER = textwrap.dedent(
    """
    import io, os, signal, sys
    from pathlib import Path
    import freshtower.core.contracts.online_checkpoint as checkpoints
    from freshtower.trainer.online import OnlineTrainer
    from tests.conftest import DAY0, DAY1, make_settings

    data_dir, kill_at, fraction, batches = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    real_write, written = checkpoints.atomic_write, []

    def dying_write(path, write, **kwargs):
        written.append(path)
        if len(written) < kill_at:
            return real_write(path, write, **kwargs)

        def part_then_kill(handle):
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            handle.write(data[: int(len(data) * fraction)])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        return real_write(path, part_then_kill, **kwargs)

    checkpoints.atomic_write = dying_write
    trainer = OnlineTrainer.start(make_settings(Path(data_dir), training={"checkpoint_every_seconds": 0}))
    trainer.run(max_batches=batches, prefetch=False)
    """
)


def test_an_online_trainer_killed_while_it_writes_a_checkpoint_resumes_without_repeating_or_skipping_a_batch(day0_model_dir, tmp_path):
    rng = random.Random(15)
    kill_at, fraction = rng.randint(2, BATCHES - 2), rng.random()
    shutil.copytree(day0_model_dir, tmp_path / "straight")
    straight = OnlineTrainer.start(make_settings(tmp_path / "straight"))
    straight.run(max_batches=BATCHES, prefetch=False)

    data_dir = tmp_path / "data"
    shutil.copytree(day0_model_dir, data_dir)
    args = [str(data_dir), str(kill_at), str(fraction), str(BATCHES)]
    result = subprocess.run([sys.executable, "-c", KILLED_ONLINE_TRAINER, *args], env=child_env(), capture_output=True, timeout=300)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    settings = make_settings(data_dir)
    path = checkpoint_path(settings)
    assert any(p.name.startswith(f".{path.name}.tmp-") for p in path.parent.iterdir())  # the cut-off write is there...
    kept = read_online_checkpoint(path)  # ...but the checkpoint read is the previous one, whole

    resumed = OnlineTrainer.start(settings)  # started again
    assert (resumed.step, resumed.next_window_ms) == (kept.step, kept.next_window_ms)
    trained_before = kill_at - 1  # one checkpoint per batch: the kill_at-th never landed
    resumed.run(max_batches=BATCHES - trained_before, prefetch=False)
    assert resumed.stats.batches == BATCHES - trained_before
    assert resumed.next_window_ms == straight.next_window_ms and resumed.step == straight.step
    assert torch.equal(user_rows(resumed), user_rows(straight))  # every batch's effect once, as in the undisturbed run
    print(f"\nonline trainer killed in checkpoint {kill_at} at {fraction:.0%} of its bytes: resumed after {trained_before} batches")


KILLED_DAILY_TRAINER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from freshtower.trainer.full import train_full
    from tests.conftest import DAY0, DAY1, make_settings

    import os, signal
    kill_at = float(sys.argv[3])  # a share of the training pass

    def progress(phase, done, total):
        if phase == "train" and done >= kill_at * total:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no finally blocks

    train_full(make_settings(Path(sys.argv[1])), sys.argv[2], progress=progress)
    """
)


def test_a_daily_trainer_killed_mid_training_leaves_latest_and_a_second_run_learns_the_same_data_once(day0_model_dir, tmp_path):
    shutil.copytree(day0_model_dir, tmp_path / "straight")
    started = time.monotonic()
    straight = train_full(make_settings(tmp_path / "straight"), DAY1)
    seconds = time.monotonic() - started

    data_dir = tmp_path / "data"
    shutil.copytree(day0_model_dir, data_dir)
    settings = make_settings(data_dir)
    before = latest_full_model(full_models_dir(settings)).version
    delay = random.Random(15).uniform(0.1, 0.9)  # a seeded moment of the training pass
    child = subprocess.Popen([sys.executable, "-c", KILLED_DAILY_TRAINER, str(data_dir), DAY1, str(delay)], env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert child.wait(300) == -9, child.stderr.read().decode()[-2000:]
    assert latest_full_model(full_models_dir(settings)).version == before  # nothing half-trained is LATEST

    leftovers = [p.name for p in settings.scratch_dir.iterdir()]
    assert leftovers  # the killed run's shard directory: its clean-up never ran

    again = train_full(settings, DAY1)  # started again
    latest = latest_full_model(full_models_dir(settings))
    assert latest.version == again.ref.version == straight.ref.version
    assert not [p for p in full_models_dir(settings).iterdir() if p.name.startswith(".staging")]
    assert not set(leftovers) & {p.name for p in settings.scratch_dir.iterdir()}  # removed by the next training
    # The same data learnt once: the same positives and event-time range as an undisturbed run.
    ours, theirs = latest.manifest, straight.ref.manifest
    assert again.samples == straight.samples
    assert (ours.parent, ours.data_start_ms, ours.data_end_ms) == (theirs.parent, theirs.data_start_ms, theirs.data_end_ms)
    assert ours.newest_click_event_time_ms == theirs.newest_click_event_time_ms
    # Training is not bit-reproducible between runs (multi-threaded float sums), so the weights are
    # reported, not compared; every one is finite.
    a, b = load_full_model(latest).model.state_dict(), load_full_model(straight.ref).model.state_dict()
    differences = {name: float((a[name].float() - b[name].float()).abs().max()) for name in a if a[name].is_floating_point()}
    assert all(torch.isfinite(t).all() for t in a.values() if t.is_floating_point())
    print(f"\ndaily trainer killed {delay:.0%} through its training pass ({seconds:.1f} s undisturbed); largest weight difference to an "
          f"undisturbed run {max(differences.values()):.2e}")
