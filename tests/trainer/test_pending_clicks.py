from __future__ import annotations

import numpy as np
import torch
from freshtower.trainer.pending_clicks import PendingClicks

from freshtower.core.batches import FeatureSpec
from freshtower.core.fingerprints import fingerprint_strings
from tests.trainer.test_corrections import clicks

SPEC = FeatureSpec(("age_bucket", "city", "device"), ("a", "b", "c"), ("category",))


def test_held_clicks_come_back_when_their_user_is_admitted_and_only_then():
    pending = PendingClicks(capacity=100, spec=SPEC)
    first = clicks(["new", "known", ""], ["i1", "i2", "i3"], [("h1",), (), ()])
    # "new" has no row yet (0), "known" has row 5, "" never gets one
    assert pending.hold_and_release(first, np.array([0, 5, 0]), admitted_rows=np.zeros(0, np.int64)) is None
    assert len(pending) == 1 and pending.users() == 1
    second = clicks(["other", "new"], ["i4", "i5"], seed=1)
    released = pending.hold_and_release(second, np.array([0, 7]), admitted_rows=np.array([7]))
    assert released.user_ids == ["new"] and released.item_ids == ["i1"] and released.hard_negative_ids == [("h1",)]
    assert len(pending) == 1 and pending.users() == 1  # "other" waits now; "new" is gone


def test_the_buffer_is_bounded_and_drops_the_oldest_first():
    pending = PendingClicks(capacity=5, spec=SPEC)
    for n in range(4):  # 4 minibatches of 3 one-click users: 12 clicks for 5 places
        batch = clicks([f"u{n}-{k}" for k in range(3)], ["i"] * 3, seed=n)
        pending.hold_and_release(batch, np.zeros(3, np.int64), np.zeros(0, np.int64))
        assert len(pending) <= 5
    assert sorted(pending.held_clicks().user_ids) == ["u3-0", "u3-1", "u3-2"]  # whole older minibatches went first


def test_state_round_trips_through_plain_tensors_and_lists(tmp_path):
    pending = PendingClicks(capacity=10, spec=SPEC)
    pending.hold_and_release(clicks(["a", "b"], ["i1", "i2"], [("x", "y"), ()]), np.zeros(2, np.int64), np.zeros(0, np.int64))
    torch.save(pending.state_dict(), tmp_path / "state.pt")
    restored = PendingClicks.from_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), SPEC)
    held, again = pending.held_clicks(), restored.held_clicks()
    assert again.user_ids == held.user_ids and again.hard_negative_ids == held.hard_negative_ids
    assert np.array_equal(again.user_numeric, held.user_numeric) and again.user_categorical == held.user_categorical


def test_a_rebase_keeps_only_users_still_without_a_row_and_clicks_before_the_replay():
    pending = PendingClicks(capacity=10, spec=SPEC)
    batch = clicks(["a", "b", "c"], ["i1", "i2", "i3"])  # event times start_ms + 0, 1, 2
    pending.hold_and_release(batch, np.zeros(3, np.int64), np.zeros(0, np.int64))
    with_rows = set(fingerprint_strings(["a"]).tolist())  # the new full model admitted "a"
    rows_of = lambda fingerprints: np.array([3 if f in with_rows else 0 for f in fingerprints.tolist()])  # noqa: E731
    dropped = pending.rebase(rows_of, replay_from_ms=int(batch.event_time_ms[2]))  # "c" will be trained again
    assert dropped == 2 and pending.held_clicks().user_ids == ["b"]
