"""Loss modules against manual sums: KL direction, zero weights, UHC, KD temperature, CE."""

from __future__ import annotations

import math

import pytest
import torch

from muki_ray.method.losses import LossContext, SupervisedCELoss, UHCLoss, VanillaKDLoss, WeightedKLLoss


def manual_kl(t, logits):
    """Σ_y t log(t / q) by explicit loops, q = softmax(logits)."""
    total = []
    for row_t, row_l in zip(t.tolist(), logits.tolist()):
        z = sum(math.exp(x) for x in row_l)
        q = [math.exp(x) / z for x in row_l]
        total.append(sum(a * math.log(a / b) for a, b in zip(row_t, q) if a > 0))
    return total


def test_weighted_kl_direction_and_weights():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]])
    w = torch.tensor([2.0, 0.5])
    kl = manual_kl(t, logits)
    expected = (2.0 * kl[0] + 0.5 * kl[1]) / 2
    assert WeightedKLLoss()(logits, {"target": t, "weight": w}).item() == pytest.approx(expected, rel=1e-5)
    # KL(t || q) != KL(q || t): the reverse direction gives a different number.
    q = logits.softmax(-1)
    reverse = (q * (q.log() - t.clamp_min(1e-12).log())).sum(-1).mean().item()
    assert abs(WeightedKLLoss()(logits, {"target": t}).item() - reverse) > 1e-3
    # Zero when the student matches the target.
    assert WeightedKLLoss()(torch.log(t + 1e-12), {"target": t.clone()}).item() == pytest.approx(0.0, abs=1e-6)


def test_zero_weight_row_has_zero_gradient():
    logits = torch.randn(3, 4, requires_grad=True)
    t = torch.softmax(torch.randn(3, 4), -1)
    WeightedKLLoss()(logits, {"target": t, "weight": torch.tensor([1.0, 0.0, 2.0])}).backward()
    assert torch.equal(logits.grad[1], torch.zeros(4))
    assert logits.grad[0].abs().sum() > 0 and logits.grad[2].abs().sum() > 0


def test_empty_batch_is_zero_with_graph():
    logits = torch.zeros(0, 3, requires_grad=True)
    for loss in (WeightedKLLoss()(logits, {"target": torch.zeros(0, 3), "weight": torch.zeros(0)}),
                 VanillaKDLoss(2.0)(logits, {"target": torch.zeros(0, 3)}),
                 UHCLoss([[0, 1]], ["a"])(logits, {"a": torch.zeros(0, 2)}),
                 SupervisedCELoss()(logits, {"gold": torch.zeros(0, dtype=torch.long)})):
        assert loss.item() == 0.0
        loss.backward()


def test_vanilla_kd_temperature_squared():
    logits = torch.tensor([[2.0, 0.0, 1.0]])
    t = torch.tensor([[0.5, 0.25, 0.25]])
    for temp in (2.0, 5.0):
        expected = temp**2 * manual_kl(t, logits / temp)[0]
        assert VanillaKDLoss(temp)(logits, {"target": t}).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        VanillaKDLoss(0.0)
    assert VanillaKDLoss.build(LossContext(kd_temperature=2.0)).temperature == 2.0


def test_uhc_against_formula():
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5]])
    p1, pos1 = torch.tensor([[0.8, 0.2]]), [0, 1]
    p2, pos2 = torch.tensor([[0.1, 0.6, 0.3]]), [2, 3, 4]
    # S restricted to Y_i and renormalized = softmax of the gathered logits.
    expected = manual_kl(p1, logits[:, pos1])[0] + manual_kl(p2, logits[:, pos2])[0]
    assert UHCLoss.build(LossContext(positions=[pos1, pos2], prob_columns=["t1", "t2"]))(
        logits, {"t1": p1, "t2": p2}).item() == pytest.approx(expected, rel=1e-5)


def test_supervised_ce_ignores_unknown():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    gold = torch.tensor([0, -100])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert SupervisedCELoss()(logits, {"gold": gold}).item() == pytest.approx(expected, rel=1e-5)
    assert SupervisedCELoss()(logits, {"gold": torch.tensor([0, -1])}).item() == pytest.approx(expected, rel=1e-5)
