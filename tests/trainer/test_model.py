from __future__ import annotations

import numpy as np
import torch
from freshtower.trainer.model import TwoTowerModel
from freshtower.trainer.sparse_optim import RowWiseAdagrad, grow_table

from freshtower.core.settings import load_settings


def small_model(tmp_path, **vocabulary) -> TwoTowerModel:
    settings = load_settings(data_dir=tmp_path, vocabulary={"user_min_count": 1, **vocabulary})
    torch.manual_seed(0)
    return TwoTowerModel(settings.model, settings.vocabulary)


def user_batch(model, ids):
    n = len(ids)
    return model.user_inputs(ids, {"age_bucket": ["25-34"] * n, "city": ["c1"] * n, "device": ["ios"] * n}, np.zeros((n, 3)))


def test_tower_outputs_are_unit_vectors(tmp_path):
    model = small_model(tmp_path)
    vectors = model.user_vectors(user_batch(model, ["a", "b"]))
    assert vectors.shape == (2, 64)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)


def test_new_ids_get_rows_that_start_near_the_default_row_and_apart(tmp_path):
    model = small_model(tmp_path)
    new_rows = model.observe_users(["a", "b"], {"age_bucket": ["x", "y"], "city": ["c", "c"], "device": ["d", "d"]}, day=0)
    from freshtower.trainer.sparse_optim import ROW_NOISE_STD

    model.sync_tables(new_rows, row_noise_std=ROW_NOISE_STD)  # as full training does
    table = model.user_tower.id_embedding
    assert table.shape[0] >= 3
    rows = model.user_ids.lookup(["a", "b", "unknown"]).tolist()
    assert rows == [1, 2, 0]
    for row in (1, 2):  # the default row plus a little noise: close to it, not a copy of it
        offset = (table[row] - table[0]).detach()
        assert 0 < offset.std() < 3 * ROW_NOISE_STD
    assert not torch.equal(table[1], table[2])  # admitted together, yet apart (symmetry broken)


def test_growing_keeps_the_parameter_and_pads_optimiser_state():
    table = torch.nn.Parameter(torch.randn(2, 4))
    optimizer = RowWiseAdagrad([table], lr=0.1)
    table.grad = torch.ones(2, 4).to_sparse()
    optimizer.step()
    before = table.detach().clone()
    grow_table(table, 5, [optimizer])
    assert table.shape[0] == 5
    assert torch.equal(table[:2], before)
    assert optimizer.state[table]["sum"].shape == (5,)
    assert optimizer.state[table]["sum"][2:].eq(0).all()


def test_rowwise_adagrad_matches_its_formula():
    table = torch.nn.Parameter(torch.zeros(3, 2))
    optimizer = RowWiseAdagrad([table], lr=0.5, eps=0.0)
    # gradient [3, 4] on row 1: s = mean(9, 16) = 12.5; w -= 0.5 * g / sqrt(12.5)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.tensor([[3.0, 4.0]]), (3, 2), check_invariants=True)
    optimizer.step()
    expected = -0.5 * torch.tensor([3.0, 4.0]) / 12.5**0.5
    assert torch.allclose(table[1], expected)
    assert table[0].eq(0).all() and table[2].eq(0).all()


def test_export_import_round_trip_keeps_vectors(tmp_path):
    model = small_model(tmp_path)
    model.sync_tables(model.observe_users(["a", "b"], {"age_bucket": ["x", "y"], "city": ["c", "c"], "device": ["d", "d"]}, day=0))
    with torch.no_grad():
        model.user_tower.id_embedding[1:3] += torch.randn(2, 64)
    model.catalogue.update(["i1", "i2"], {"category": ["k1", "k2"]}, day=0)
    state = model.export_state()
    copy = small_model(tmp_path / "other")
    copy.import_state(state)
    batch_ids = ["a", "b", "stranger"]
    assert torch.allclose(model.user_vectors(user_batch(model, batch_ids)), copy.user_vectors(user_batch(copy, batch_ids)))
    assert torch.allclose(model.catalogue_vectors(), copy.catalogue_vectors())
