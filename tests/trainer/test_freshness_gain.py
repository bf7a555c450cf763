"""The point of online learning: on a world whose users' interests drift
during the day, updating user ID embeddings from the stream raises
next-hour Recall@50 above the frozen daily model."""

from __future__ import annotations

import numpy as np
import pytest
from freshtower.trainer.artifacts import full_models_dir, latest_full_model, load_full_model
from freshtower.trainer.evaluation import evaluate, holdout_between
from freshtower.trainer.full import train_full
from freshtower.trainer.online import OnlineTrainer

from freshtower.app.simulator import Simulator, SimulatorConfig
from freshtower.core.batches import list_batches
from tests.conftest import make_settings

HOUR = 3_600_000


@pytest.mark.slow
def test_online_updates_beat_the_frozen_daily_model_next_hour(tmp_path):
    world = Simulator(SimulatorConfig(users=1000, items=500, topics=20, requests_per_day=8000, drift_share=0.5, seed=7))
    settings = make_settings(tmp_path)
    for day in range(3):
        world.write_batches(settings.batches_dir, day, 300)
    train_full(settings, world.day_name(0))
    train_full(settings, world.day_name(1))
    frozen = load_full_model(latest_full_model(full_models_dir(settings))).model
    online = OnlineTrainer.start(settings)
    refs = list_batches(settings.batches_dir)
    day2 = world.day_start_ms(2)
    for ref in refs:  # catch up from the daily model's data end to day 2
        if ref.window_start_ms < day2 and ref.window_start_ms >= online.next_window_ms:
            online.learn_batch(ref)

    rows = []
    for hour in range(0, 23):
        for ref in refs:
            if day2 + hour * HOUR <= ref.window_start_ms < day2 + (hour + 1) * HOUR:
                online.learn_batch(ref)
        holdout = holdout_between(refs, online.spec, day2 + (hour + 1) * HOUR, day2 + (hour + 2) * HOUR)
        if len(holdout) < 20:
            continue
        frozen_recall = evaluate(frozen, holdout, (50,), None)["exact"]["recall@50"]
        online_recall = evaluate(online.model, holdout, (50,), None)["exact"]["recall@50"]
        rows.append((hour + 1, len(holdout), frozen_recall, online_recall))

    print("\nnext-hour Recall@50 on day 2 (users with clicks in that hour)")
    print("hour  users  frozen daily  daily + online")
    for hour, users, frozen_recall, online_recall in rows:
        print(f"{hour:4d}  {users:5d}  {frozen_recall:12.4f}  {online_recall:14.4f}")
    users = np.array([r[1] for r in rows])
    frozen_mean = float(np.average([r[2] for r in rows], weights=users))
    online_mean = float(np.average([r[3] for r in rows], weights=users))
    print(f"mean  {users.sum():5d}  {frozen_mean:12.4f}  {online_mean:14.4f}")
    assert len(rows) >= 15
    assert online_mean > frozen_mean + 0.02
    assert sum(r[3] > r[2] for r in rows) >= 0.8 * len(rows)
