from __future__ import annotations

import math

import pytest
import torch
from freshtower.trainer import distillation as d

from freshtower.core.settings import DistillationConfig

LN3 = math.log(3.0)


def test_soft_label_bce_by_hand():
    # x = 0, y = 0.5: sigmoid 0.5 -> -0.5 ln 0.5 - 0.5 ln 0.5 = ln 2 = 0.693147
    # x = ln 3, y = 0.75: sigmoid 0.75 -> -0.75 ln 0.75 - 0.25 ln 0.25 = 0.562335; mean 0.627741
    loss = d.soft_label_bce(torch.tensor([0.0, LN3]), torch.tensor([0.5, 0.75]))
    assert loss.item() == pytest.approx(0.6277412, abs=1e-6)
    # weights [1, 3]: (0.693147 + 3 * 0.562335) / 4 = 0.595038
    weighted = d.soft_label_bce(torch.tensor([0.0, LN3]), torch.tensor([0.5, 0.75]), torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx((math.log(2) + 3 * 0.5623351) / 4, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d.soft_label_bce(torch.zeros(2), torch.tensor([0.5, 1.5]))


def test_listwise_kl_by_hand():
    # request 0: teacher logits [0, ln 3] -> p_t = [1/4, 3/4]; student [0, 0] -> p_s = [1/2, 1/2]
    #   KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812
    # request 1: one candidate -> not counted; request 2: empty -> not counted
    # request 3: teacher equals student -> KL 0; mean over requests 0 and 3 = 0.065406
    offsets = torch.tensor([0, 2, 3, 3, 6])
    student = torch.tensor([0.0, 0.0, 7.0, 1.0, 2.0, 3.0])
    teacher = torch.tensor([0.0, LN3, -4.0, 1.0, 2.0, 3.0])
    assert d.listwise_distillation(student, teacher, offsets).item() == pytest.approx(0.1308120 / 2, abs=1e-6)
    # temperature 2: p_t ∝ [1, sqrt 3] = [0.366025, 0.633975]; KL to [1/2, 1/2] = 0.036341; times T^2 = 4:
    # 0.145363 for request 0, mean with request 3 -> 0.072682
    assert d.listwise_distillation(student, teacher, offsets, temperature=2.0).item() == pytest.approx(0.1453631 / 2, abs=1e-6)


def test_listwise_kl_is_zero_without_a_request_of_two_and_keeps_the_graph():
    student = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = d.listwise_distillation(student, torch.tensor([0.0, 5.0]), torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad.tolist() == [0.0, 0.0]


def test_teacher_scores_in_logit_space_by_hand():
    # scores [0.2, 0.8] -> logits [ln 1/4, ln 4]: p_t ∝ [1, 16] = [1/17, 16/17]; student [0, 0]:
    # KL = 1/17 ln(2/17) + 16/17 ln(32/17) = 0.469429
    config = DistillationConfig(mode="listwise", teacher_space="logit", temperature=1.0)
    loss = d.distillation_loss(torch.zeros(2), torch.tensor([0.2, 0.8]), torch.tensor([0, 2]), config)
    assert loss.item() == pytest.approx(0.4694291, abs=1e-6)
    # in score space the logits are [0.2, 0.8]: softmax [1 / (1 + e^0.6), ...] = [0.354344, 0.645656],
    # KL = 0.354344 ln 0.708687 + 0.645656 ln 1.291313 = 0.043053
    score_config = config.model_copy(update={"teacher_space": "score"})
    score_space = d.distillation_loss(torch.zeros(2), torch.tensor([0.2, 0.8]), torch.tensor([0, 2]), score_config)
    assert score_space.item() == pytest.approx(0.0430530, abs=1e-6)
    # scores of exactly 0 and 1 are clipped to [1e-4, 1 - 1e-4]: finite
    assert torch.isfinite(d.distillation_loss(torch.zeros(2), torch.tensor([0.0, 1.0]), torch.tensor([0, 2]), config))


def test_pointwise_mode_is_bce_on_the_scores():
    config = DistillationConfig(mode="pointwise")
    loss = d.distillation_loss(torch.tensor([0.0, LN3]), torch.tensor([0.5, 0.75]), torch.tensor([0, 2]), config)
    assert loss.item() == pytest.approx(0.6277412, abs=1e-6)


def test_combined_objective_weights_the_terms():
    # 0.5 * 2 + 3 * 0.25 = 1.75
    assert d.combined_objective(torch.tensor(2.0), torch.tensor(0.25), 0.5, 3.0).item() == pytest.approx(1.75)
    with pytest.raises(ValueError, match="both 0"):
        d.combined_objective(torch.tensor(1.0), torch.tensor(1.0), 0.0, 0.0)


def test_prerank_objective_by_hand():
    # logits [0, ln 3] in one request, clicks [0, 1], scores [0.5, 0.75]
    # click BCE: (ln 2 + -ln 0.75) / 2 = (0.693147 + 0.287682) / 2 = 0.490415
    # listwise, logit space: teacher logits [0, ln 3] = the student's -> KL 0
    # 1.0 * 0.490415 + 2.0 * 0 = 0.490415; pointwise: + 2.0 * 0.627741 = 1.745897
    logits, clicks, scores, offsets = torch.tensor([0.0, LN3]), torch.tensor([0, 1]), torch.tensor([0.5, 0.75]), torch.tensor([0, 2])
    listwise = DistillationConfig(mode="listwise", click_weight=1.0, distill_weight=2.0)
    assert d.prerank_objective(logits, clicks, scores, offsets, listwise).item() == pytest.approx(0.4904146, abs=1e-6)
    pointwise = listwise.model_copy(update={"mode": "pointwise"})
    assert d.prerank_objective(logits, clicks, scores, offsets, pointwise).item() == pytest.approx(0.4904146 + 2 * 0.6277412, abs=1e-6)
    distill_only = listwise.model_copy(update={"click_weight": 0.0, "mode": "pointwise"})
    assert d.prerank_objective(logits, clicks, scores, offsets, distill_only).item() == pytest.approx(2 * 0.6277412, abs=1e-6)


def test_bad_offsets_are_refused():
    for offsets, message in (([1, 2], "from 0 to 2"), ([0, 3], "from 0 to 2"), ([0, 2, 1, 2], "decrease")):
        with pytest.raises(ValueError, match=message):
            d.listwise_distillation(torch.zeros(2), torch.zeros(2), torch.tensor(offsets))


def test_gradients_pass_gradcheck_in_float64():
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 3, 3, 4, 8, 10])  # an empty request and a single one among them
    student = torch.randn(10, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(10, dtype=torch.float64, generator=generator)
    labels = torch.rand(10, dtype=torch.float64, generator=generator)
    weights = torch.rand(10, dtype=torch.float64, generator=generator) + 0.1
    for temperature in (0.5, 1.0, 3.0):
        assert torch.autograd.gradcheck(lambda s: d.listwise_distillation(s, teacher, offsets, temperature), (student,))
    assert torch.autograd.gradcheck(lambda s: d.segment_log_softmax(s, offsets), (student,))
    assert torch.autograd.gradcheck(lambda s: d.soft_label_bce(s, labels, weights), (student,))


def test_listwise_gradient_is_temperature_times_the_softmax_gap():
    # d/dz_j [T^2 KL(p_t || softmax(z / T))] = T (p_s,j - p_t,j), divided by the requests counted
    offsets = torch.tensor([0, 2, 5])
    student = torch.tensor([0.3, -0.2, 1.0, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    T = 2.0
    d.listwise_distillation(student, teacher, offsets, T).backward()
    expected = torch.cat([torch.softmax(student[a:b].detach() / T, 0) - torch.softmax(teacher[a:b] / T, 0) for a, b in ((0, 2), (2, 5))])
    assert torch.allclose(student.grad, T * expected / 2)
