from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from freshtower.trainer.full import train_full
from freshtower.trainer.online import MissingModelError, OnlineTrainer

from freshtower.core.batches import list_batches, read_batch
from tests.conftest import DAY0, DAY1, make_settings



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
    # One torch thread in both: with prefetch the trainer leaves a core to the
    # decoder, and a different thread count sums in a different order.
    one_thread = {"threads": 1}
    background = OnlineTrainer.start(make_settings(data_dir, training=dict(one_thread)))
    background.run(max_batches=5, prefetch=True)
    inline = OnlineTrainer.start(make_settings(other, training=dict(one_thread)))
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


def test_the_fork_starts_where_the_full_models_data_ends(data_dir):
    # The day-0 model learnt every day-0 batch, so the online trainer forked
    # from it starts at the first batch of day 1: it neither skips a window
    # nor learns one the full model learnt (a trailing holdout would leave
    # the last 5% of day 0 to the online trainer alone).
    settings = make_settings(data_dir)
    trainer = OnlineTrainer.start(settings)
    day0, day1 = list_batches(settings.batches_dir, DAY0), list_batches(settings.batches_dir, DAY1)
    assert trainer.base.data_end_ms == day0[-1].manifest.window_end_ms
    assert [r.path for r in trainer.pending()[: len(day1)]] == [r.path for r in day1]
    trained_files = {e.file for e in trainer.base.manifest.lineage if e.role == "train"}
    assert trained_files == {str(r.path.relative_to(settings.batches_dir)) for r in day0}


def _relative_updates(table_before, table_after, rows) -> np.ndarray:
    before, after = table_before[rows], table_after[rows]
    return ((after - before).norm(dim=1) / before.norm(dim=1).clamp_min(1e-12)).numpy()


def test_the_first_online_step_moves_rows_as_far_as_the_full_trainers_last_steps(tmp_path, simulated_batches, monkeypatch):
    # Row-wise Adagrad scales a row's step by 1/sqrt(its squared-gradient
    # sum). After two full days (each user's row updated ~11 times a day,
    # the day-0 sums halved at the warm start) the full trainer's last steps
    # are ~1/sqrt(16) of a first step. Forked with fresh (zero) sums, the
    # first online minibatch takes first steps, ~4x longer, and undoes the
    # full model; carried over, it continues at the full trainer's pace
    # (within 2x). Rows admitted in a step are left out (new rows start from
    # zero sums in both trainers).
    from freshtower.trainer.learner import Learner

    data_dir = tmp_path / "data"
    shutil.copytree(simulated_batches, data_dir / "batches")
    settings = make_settings(data_dir)
    steps: list[tuple[str, np.ndarray]] = []
    original = Learner.learn

    def recording_learn(self, samples, where="", observe=True):
        table = self.model.user_tower.id_embedding
        known_rows, before = len(self.model.user_ids), table.detach().clone()
        result = original(self, samples, where, observe)
        rows = torch.from_numpy(result.updated_user_rows[result.updated_user_rows < known_rows])
        steps.append((self.trainable, _relative_updates(before, table.detach(), rows)))
        return result

    train_full(settings, DAY0)
    monkeypatch.setattr(Learner, "learn", recording_learn)
    train_full(settings, DAY1)
    full_last = np.median(np.concatenate([r for kind, r in steps if kind == "all"][-3:]))
    trainer = OnlineTrainer.start(settings)
    trainer.learn_batch(trainer.pending()[0])
    online_first = np.median(np.concatenate([r for kind, r in steps if kind == "user_ids"]))
    print(f"median relative row update: full trainer's last 3 steps {full_last:.4f}, first online batch {online_first:.4f}")
    assert 0.5 < online_first / full_last < 2


def test_a_new_users_first_clicks_are_learnt_once_the_row_is_admitted(data_dir, monkeypatch):
    # user_min_count = 2: a new user's first click reads the default row,
    # which online training never moves. The click is held and learnt in
    # the minibatch that admits the user, so every click of a user admitted
    # online reaches the loss with the user's own row.
    from freshtower.trainer.learner import Learner

    settings = make_settings(data_dir, training={"positive_resampling": {"enabled": False}})
    given: dict[str, int] = {}
    with_row: dict[str, int] = {}
    learn, forward = Learner.learn, Learner._forward

    def recording_learn(self, samples, where="", observe=True):
        for user in (u for u, label in zip(samples.user_ids, samples.labels) if label == 1):
            given[user] = given.get(user, 0) + 1
        return learn(self, samples, where, observe)

    def recording_forward(self, positives, probabilities):
        rows = self.model.user_ids.lookup(positives.user_ids)
        for user in (u for u, row in zip(positives.user_ids, rows.tolist()) if row):
            with_row[user] = with_row.get(user, 0) + 1
        return forward(self, positives, probabilities)

    trainer = OnlineTrainer.start(settings)
    known = set(filter(None, trainer.model.user_ids.row_ids()))
    monkeypatch.setattr(Learner, "learn", recording_learn)
    monkeypatch.setattr(Learner, "_forward", recording_forward)
    trainer.run(max_batches=len(list_batches(settings.batches_dir, DAY1)), prefetch=False)
    admitted = set(filter(None, trainer.model.user_ids.row_ids())) - known
    short = {u: (with_row.get(u, 0), given[u]) for u in admitted if with_row.get(u, 0) != given[u]}
    missing = sum(given[u] - with_row.get(u, 0) for u in short)
    print(f"{len(admitted)} users admitted online, {sum(given[u] for u in admitted)} of their clicks; "
          f"{len(short)} of them with {missing} clicks learnt without their row")
    assert len(admitted) >= 10
    assert not short
    assert len(trainer.learner.pending) <= settings.vocabulary.pending_clicks
