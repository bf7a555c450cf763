from __future__ import annotations

import math

import pytest
import torch
from freshtower.trainer import losses

A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two unit user vectors
B = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # their clicked items


def test_cosine_logits_divide_by_temperature():
    # cosines [[1, 0.6], [0, 0.8]] / 0.5
    assert torch.allclose(losses.cosine_logits(A, B, 0.5), torch.tensor([[2.0, 1.2], [0.0, 1.6]]))


def test_in_batch_softmax_matches_hand_value():
    # row 0: logits [2, 1.2] -> log(1 + e^-0.8) = 0.371101
    # row 1: logits [0, 1.6] -> log(1 + e^-1.6) = 0.183901; mean 0.277501
    loss = losses.in_batch_softmax_loss(A, B, 0.5)
    assert loss.item() == pytest.approx(0.2775007, abs=1e-6)


def test_logq_correction_subtracts_log_probability_per_column():
    # p = [0.5, 0.25]: columns gain +log 2 and +log 4
    # row 0: [2 + 0.6931, 1.2 + 1.3863] -> log(1 + e^-0.1069) = 0.641147
    # row 1: [0 + 0.6931, 1.6 + 1.3863] -> log(1 + e^-2.2931) = 0.096172; mean 0.368660
    loss = losses.in_batch_softmax_loss(A, B, 0.5, item_probabilities=torch.tensor([0.5, 0.25]))
    assert loss.item() == pytest.approx(0.3686596, abs=1e-6)
    corrected = losses.sampling_probability_correction(torch.zeros(1, 2), torch.tensor([1.0, 1e-9]), probability_floor=1e-4)
    assert corrected[0].tolist() == pytest.approx([0.0, -math.log(1e-4)])  # p is clipped at the caller's floor, 1e-4
    floored = losses.in_batch_softmax_loss(A, B, 0.5, item_probabilities=torch.tensor([1e-9, 1e-9]), probability_floor=1e-4)
    # both columns clipped to 1e-4 gain the same +9.21: the plain loss again
    assert floored.item() == pytest.approx(losses.in_batch_softmax_loss(A, B, 0.5).item(), abs=1e-5)


def test_accidental_hits_mask_the_same_item_off_the_diagonal():
    # both rows clicked item 7: each row's other column is its own positive,
    # masked, so each row's softmax holds only its diagonal: loss 0
    loss = losses.in_batch_softmax_loss(A, B, 0.5, item_keys=torch.tensor([7, 7]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    masked = losses.remove_accidental_hits(torch.zeros(2, 2), torch.tensor([7, 7]), torch.tensor([7, 7]))
    assert masked[0, 0] == 0 and masked[0, 1] < -1e8 and masked[1, 1] == 0


def test_sampled_softmax_with_and_without_mask():
    pos, neg = torch.tensor([0.5]), torch.tensor([[0.0, -0.5]])
    # -log(e^0.5 / (e^0.5 + e^0 + e^-0.5)) = log(1 + e^-0.5 + e^-1) = 0.680270
    assert losses.sampled_softmax_loss(pos, neg, 1.0).item() == pytest.approx(0.6802697, abs=1e-6)
    # second negative masked: log(1 + e^-0.5) = 0.474077
    mask = torch.tensor([[True, False]])
    assert losses.sampled_softmax_loss(pos, neg, 1.0, mask).item() == pytest.approx(0.4740770, abs=1e-6)


def test_pointwise_binary_cross_entropy_on_cosines():
    # positive 0.5 -> softplus(-0.5) = 0.474077; negatives 0 and -0.5 ->
    # softplus(0) = 0.693147, softplus(-0.5) = 0.474077; mean of 3 = 0.547100
    loss = losses.pointwise_loss(torch.tensor([0.5]), torch.tensor([[0.0, -0.5]]), 1.0)
    assert loss.item() == pytest.approx(0.5471004, abs=1e-6)


def test_triplet_hinge_loss():
    # max(0, 0.4 + 0.2 - 0.5) = 0.1, max(0, 0.1 + 0.2 - 0.5) = 0 -> mean 0.05
    loss = losses.triplet_hinge_loss(torch.tensor([0.5]), torch.tensor([[0.4, 0.1]]), margin=0.2)
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    masked = losses.triplet_hinge_loss(torch.tensor([0.5]), torch.tensor([[0.4, 0.1]]), 0.2, torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(0.1, abs=1e-6)


def test_triplet_logistic_loss():
    # log(1 + e^(10 * -0.1)) = 0.313262, log(1 + e^(10 * -0.4)) = 0.018149 -> mean 0.165706
    loss = losses.triplet_logistic_loss(torch.tensor([0.5]), torch.tensor([[0.4, 0.1]]), sigma=10.0)
    assert loss.item() == pytest.approx(0.1657058, abs=1e-6)


def test_losses_fall_when_the_positive_wins():
    pos, neg = torch.tensor([0.9]), torch.tensor([[0.1, 0.0]])
    worse_pos = torch.tensor([0.2])
    for fn, arg in [
        (losses.sampled_softmax_loss, 0.1),
        (losses.pointwise_loss, 0.1),
        (losses.triplet_hinge_loss, 0.5),
        (losses.triplet_logistic_loss, 5.0),
    ]:
        assert fn(pos, neg, arg) < fn(worse_pos, neg, arg)


def test_non_finite_loss_raises_with_location():
    with pytest.raises(losses.NonFiniteLossError, match="batch 7"):
        losses.check_finite(torch.tensor(float("nan")), "batch 7")
    with pytest.raises(losses.NonFiniteLossError):
        losses.check_finite(torch.tensor(float("inf")), "x")
    losses.check_finite(torch.tensor(1.0), "fine")


def test_in_batch_softmax_over_a_wider_candidate_set_with_padding():
    # Columns [pad, item 0, item 1, pad]: rows 0 and 1 target columns 1 and 2;
    # the padding columns are masked, so the value is the plain 0.277501.
    candidates = torch.cat([torch.zeros(1, 2), B, torch.zeros(1, 2)])
    loss = losses.in_batch_softmax_loss(
        A,
        candidates,
        0.5,
        item_keys=torch.tensor([-1, 3, 4, -1]),
        targets=torch.tensor([1, 2]),
        positive_keys=torch.tensor([3, 4]),
        candidate_mask=torch.tensor([False, True, True, False]),
    )
    assert loss.item() == pytest.approx(0.2775007, abs=1e-6)


def _reference_in_batch_softmax(
    users, items, temperature, probabilities, keys, targets=None, positive_keys=None, mask=None, row_weights=None
):
    """The plain composition the fused loss replaces: the oracle."""
    logits = losses.cosine_logits(users, items, temperature)
    if probabilities is not None:
        logits = losses.sampling_probability_correction(logits, probabilities)
    if keys is not None:
        logits = losses.remove_accidental_hits(logits, keys if positive_keys is None else positive_keys, keys, targets)
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(0), -1e9)
    if targets is None:
        targets = torch.arange(len(users))
    if row_weights is not None:
        return (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * row_weights).mean()
    return torch.nn.functional.cross_entropy(logits, targets)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("distributed", [False, True])
def test_fused_in_batch_softmax_matches_the_plain_composition_in_value_and_gradients(distributed, weighted):
    generator = torch.Generator().manual_seed(3)
    b, d = 12, 5
    keys = torch.tensor([1, 2, 3, 1, 4, 5, 6, 2, 7, 8, 9, 1])  # repeats: accidental hits are masked
    users = torch.nn.functional.normalize(torch.randn(b, d, generator=generator, dtype=torch.float64), dim=1)
    # Equal keys are one item: the same vector and probability (the contract).
    by_key = torch.nn.functional.normalize(torch.randn(10, d, generator=generator, dtype=torch.float64), dim=1)
    items = by_key[keys]
    probabilities = (torch.rand(10, generator=generator, dtype=torch.float64) * 0.1 + 1e-3)[keys]
    extra = {}
    if distributed:  # two padding columns around the real ones, rows target 1..b
        pad = torch.zeros(1, d, dtype=torch.float64)
        items = torch.cat([pad, items, pad])
        probabilities = torch.cat([torch.ones(1, dtype=torch.float64), probabilities, torch.ones(1, dtype=torch.float64)])
        extra = {"targets": torch.arange(1, b + 1), "positive_keys": keys, "mask": torch.tensor([False] + [True] * b + [False])}
    column_keys = torch.cat([torch.tensor([-1]), keys, torch.tensor([-1])]) if distributed else keys
    # rows weighted as the easy/hard mix weighs them: 0.5 with hard negatives, 1 without
    row_weights = torch.tensor([0.5, 1.0] * (b // 2), dtype=torch.float64) if weighted else None
    results = []
    for function in ("fused", "reference"):
        u, v = users.clone().requires_grad_(True), items.clone().requires_grad_(True)
        if function == "fused":
            loss = losses.in_batch_softmax_loss(
                u, v, 0.1, probabilities, column_keys, extra.get("targets"), extra.get("positive_keys"), extra.get("mask"),
                row_weights=row_weights,
            )
        else:
            loss = _reference_in_batch_softmax(u, v, 0.1, probabilities, column_keys, **extra, row_weights=row_weights)
        (2.5 * loss).backward()  # an upstream gradient other than 1
        # per item: the copies' gradients summed (the fused in-batch form puts them on the first copy)
        per_item = torch.zeros(11, d, dtype=torch.float64).index_add_(0, column_keys.clamp_min(0), v.grad)
        results.append((loss.detach(), u.grad, per_item))
    (fused, fused_du, fused_dv), (reference, reference_du, reference_dv) = results
    assert fused.item() == pytest.approx(reference.item(), rel=1e-12)
    assert torch.allclose(fused_du, reference_du, atol=1e-12)
    assert torch.allclose(fused_dv, reference_dv, atol=1e-12)


def test_in_batch_softmax_over_distinct_items_matches_the_batch_form_without_repeats_too():
    generator = torch.Generator().manual_seed(5)
    users = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=1)
    items = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=1)
    keys = torch.arange(6) * 10  # all distinct: no column merges, nothing masked
    fused = losses.in_batch_softmax_loss(users, items, 0.2, item_keys=keys)
    plain = torch.nn.functional.cross_entropy(losses.cosine_logits(users, items, 0.2), torch.arange(6))
    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
    # one item clicked by every row: each row's softmax has only itself left, loss 0
    same = losses.in_batch_softmax_loss(users, items[:1].expand(6, 4), 0.2, item_keys=torch.full((6,), 3))
    assert same.item() == pytest.approx(0.0, abs=1e-12)
