"""Student losses (MUKI step 4 and the baselines). Each returns a scalar; an empty batch gives 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _kl_rows(targets: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(t ‖ q) per row = Σ_y t (log t - log q), with 0·log 0 = 0. (B, Y) -> (B,)."""
    t = targets.float()
    return (torch.xlogy(t, t) - t * log_q).sum(-1)


class WeightedKLLoss(nn.Module):
    """L = (1/B) Σ_b w_b · KL(target_b ‖ softmax(logits_b)).

    logits (B, Y) student; targets (B, Y) rows sum to 1; weights (B,) >= 0, or None for 1.
    Batch-mean over B (not Σw), so normalized margins keep the effective learning rate; a row
    with w = 0 contributes exactly zero gradient. No T² factor (MUKI's loss is KD-only at T = 1).
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None):
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        kl = _kl_rows(targets, F.log_softmax(logits.float(), dim=-1))
        if weights is not None:
            kl = kl * weights.float()
        return kl.mean()


class VanillaKDLoss(nn.Module):
    """T² · (1/B) Σ_b KL(target_b ‖ softmax(logits_b / T)).

    targets (B, Y) = softmax(concat teacher logits / T) mapped to the union (integrate.vanilla_kd_targets);
    logits (B, Y) student. The T² factor keeps gradient magnitudes comparable across T (Hinton et al.).
    """

    def __init__(self, temperature: float = 5.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, targets: torch.Tensor):
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        t = self.temperature
        return t * t * _kl_rows(targets, F.log_softmax(logits.float() / t, dim=-1)).mean()


class UHCLoss(nn.Module):
    """Σ_i (1/B) Σ_b KL(p_i,b ‖ S_b restricted to Y_i and renormalized)  (Vongkulbhisal et al. 2019).

    logits (B, Y); teacher_probs: list over teachers of (B, C_i); positions: list of LongTensor (C_i,)
    union indices. Restricting then renormalizing softmax(S) equals log_softmax of the gathered logits.
    """

    def forward(self, logits: torch.Tensor, teacher_probs, positions):
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        total = logits.new_zeros((), dtype=torch.float32)
        for p, pos in zip(teacher_probs, positions):
            log_q = F.log_softmax(logits.float().index_select(-1, pos), dim=-1)
            total = total + _kl_rows(p, log_q).mean()
        return total


class SupervisedCELoss(nn.Module):
    """Cross-entropy on gold union indices: logits (B, Y), gold (B,) int; -100 (or any <0) ignored."""

    def forward(self, logits: torch.Tensor, gold: torch.Tensor):
        gold = torch.where(gold < 0, torch.full_like(gold, -100), gold).long()
        if (gold >= 0).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), gold, ignore_index=-100)
