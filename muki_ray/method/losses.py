"""Student losses (MUKI step 4 and the baselines), one call shape: `loss(logits, batch) -> scalar`.

logits (B, Y) the student's, over the union labels; batch: a dict of (B, ...) tensors, the columns
each loss reads named in its docstring. An empty batch gives 0 (with a gradient path). A loss is
built on the training workers from plain data, `Loss.build(LossContext)`; strategies.py names
which loss each strategy trains with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossContext:
    """What a loss may need besides the batch; plain data, so it ships to every training worker."""

    kd_temperature: Optional[float] = None                       # vanilla KD's T (integration.kd_temperature)
    positions: list[list[int]] = field(default_factory=list)     # per teacher: its labels' union indices
    prob_columns: list[str] = field(default_factory=list)        # per teacher: its probabilities' batch column


def _kl_rows(targets: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(t ‖ q) per row = Σ_y t (log t - log q), with 0·log 0 = 0. (B, Y) -> (B,)."""
    t = targets.float()
    return (torch.xlogy(t, t) - t * log_q).sum(-1)


class StudentLoss(nn.Module):
    """Base: `build` makes the loss from a LossContext (the default takes nothing from it)."""

    @classmethod
    def build(cls, ctx: LossContext) -> "StudentLoss":
        return cls()


class WeightedKLLoss(StudentLoss):
    """L = (1/B) Σ_b w_b · KL(target_b ‖ softmax(logits_b)).

    batch: target (B, Y) rows sum to 1; weight (B,) >= 0, optional (1 when absent).
    Batch-mean over B (not Σw), so normalized margins keep the effective learning rate; a row
    with w = 0 contributes exactly zero gradient. No T² factor (MUKI's loss is KD-only at T = 1).
    """

    def forward(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        kl = _kl_rows(batch["target"], F.log_softmax(logits.float(), dim=-1))
        if batch.get("weight") is not None:
            kl = kl * batch["weight"].float()
        return kl.mean()


class VanillaKDLoss(StudentLoss):
    """T² · (1/B) Σ_b KL(target_b ‖ softmax(logits_b / T)).

    batch: target (B, Y) = softmax(concat teacher logits / T) mapped to the union
    (strategies.vanilla_kd). The T² factor keeps gradient magnitudes comparable across T (Hinton et al.).
    """

    def __init__(self, temperature: float):
        super().__init__()
        if not temperature or temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    @classmethod
    def build(cls, ctx: LossContext) -> "VanillaKDLoss":
        return cls(ctx.kd_temperature)

    def forward(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        t = self.temperature
        return t * t * _kl_rows(batch["target"], F.log_softmax(logits.float() / t, dim=-1)).mean()


class UHCLoss(StudentLoss):
    """Σ_i (1/B) Σ_b KL(p_i,b ‖ S_b restricted to Y_i and renormalized)  (Vongkulbhisal et al. 2019).

    positions: per teacher, its C_i union indices; columns: per teacher, the batch column holding
    its probabilities (B, C_i). Restricting then renormalizing softmax(S) equals log_softmax of the
    gathered logits.
    """

    def __init__(self, positions: list[list[int]], columns: list[str]):
        super().__init__()
        if len(positions) != len(columns):
            raise ValueError(f"{len(positions)} teachers' positions but {len(columns)} probability columns")
        self.columns = list(columns)
        for i, pos in enumerate(positions):  # buffers: they follow the module to the training device
            self.register_buffer(f"positions{i}", torch.as_tensor(pos, dtype=torch.long), persistent=False)

    @classmethod
    def build(cls, ctx: LossContext) -> "UHCLoss":
        return cls(ctx.positions, ctx.prob_columns)

    def forward(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        total = logits.new_zeros((), dtype=torch.float32)
        for i, col in enumerate(self.columns):
            log_q = F.log_softmax(logits.float().index_select(-1, getattr(self, f"positions{i}")), dim=-1)
            total = total + _kl_rows(batch[col], log_q).mean()
        return total


class SupervisedCELoss(StudentLoss):
    """Cross-entropy on gold union indices. batch: gold (B,) int; -100 (or any < 0) ignored."""

    def forward(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        gold = batch["gold"]
        gold = torch.where(gold < 0, torch.full_like(gold, -100), gold).long()
        if (gold >= 0).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), gold, ignore_index=-100)
