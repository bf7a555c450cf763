"""The clicker sums of items first seen online: kept across a checkpoint, blended into the served vector."""

from __future__ import annotations

import numpy as np
import pytest
from freshtower.trainer.new_item_clicks import NewItemClickSums, blend_with_clicks, clicks_of


def test_the_sums_survive_a_checkpoint_round_trip_by_item_id_and_ignore_older_items():
    sums = NewItemClickSums(first=3, dim=2)
    sums.add(np.array([1, 3, 5, 5, -1]), np.array([[9, 9], [1, 0], [0, 1], [0, 1], [7, 7]], np.float32))
    catalogue = ["a", "b", "c", "n3", "n4", "n5"]
    state = sums.state_dict(catalogue)
    assert state["item_ids"] == ["n3", "n5"] and state["counts"].tolist() == [1, 2]
    # restored where the catalogue holds them in another order (a restart re-reads the checkpoint's catalogue)
    restored = NewItemClickSums(first=3, dim=2)
    restored.load_state_dict(state, np.array([4, 3]))
    snap = restored.snapshot(6)
    assert snap.counts.tolist() == [2, 1, 0] and snap.sums.tolist() == [[0, 2], [1, 0], [0, 0]]
    assert clicks_of(["n5", "n3"], [state], 2).counts.tolist() == [2, 1]


def test_the_blend_moves_a_clicked_item_toward_its_clickers_more_with_more_clicks_and_keeps_unit_length():
    feature = np.array([[1.0, 0.0]] * 3, np.float32)
    sums = NewItemClickSums(first=0, dim=2)
    sums.add(np.array([1, 2, 2, 2, 2, 2, 2]), np.tile(np.array([[0.0, 1.0]], np.float32), (7, 1)))
    blended = blend_with_clicks(feature, sums.snapshot(3), prior=3.0)
    np.testing.assert_allclose(np.linalg.norm(blended, axis=1), 1.0, atol=1e-6)
    assert blended[0].tolist() == [1.0, 0.0]  # not clicked: the feature vector as it was
    assert 0 < blended[1, 1] < blended[2, 1] < 1  # one click moves it less than six
    with pytest.raises(ValueError, match="2 feature vectors for 3"):
        blend_with_clicks(feature[:2], sums.snapshot(3), prior=3.0)
