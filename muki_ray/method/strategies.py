"""The integration strategies, one row each. Everything else (the schema, the combiner, the
student, the stages) reads `STRATEGIES`. Pure numpy; the math is in integrate.py.

A row says, for one strategy:
- `score`: the per-teacher score it compares, "mc" (s = 1 - H(p̄)/log C) or "entropy" (the same
  on the deterministic softmax); a non-selecting strategy still reports its MC scores;
- `selects`: whether it picks teachers by that score, and so takes re-weighting and the selection
  options (calibration, prototypes, refine);
- `targets`: the target builder, `targets(x: TargetInputs) -> (targets (B, |Y|), teacher (B,))`;
- `loss`: the student loss, a class name in losses.py (all called `loss(student_logits, batch)`);
- `columns`: the extra targets columns that loss reads: "teacher_probs" (NAME__probs per teacher)
  or "gold" (the pool's gold union index);
- `needs_gold`: it reads gold labels on the pool (the analysis bounds `oracle` and `supervised`).

Adding a strategy: one row in `STRATEGIES` plus its target function below (and a loss class in
losses.py when none fits); the schema's choices, validation and docs/config.md follow from the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from muki_ray.method.integrate import (Integrated, entropy_scores, hard_targets, margin_weights, oracle_targets, pad,
                                soft_targets, vanilla_kd_targets)


@dataclass(frozen=True)
class TargetInputs:
    """What a target builder reads; lists are over the N teachers, B rows."""

    dists: Sequence[np.ndarray]      # (B, C_i) the distribution a target is built from (target_probs)
    logits: Sequence[np.ndarray]     # (B, C_i) raw teacher logits
    scores: np.ndarray               # (B, N) the selection scores (calibrated / prototype when given)
    gold: Optional[np.ndarray]       # (B,) gold union index, -1 unknown; None without gold labels
    positions: Sequence[np.ndarray]  # (C_i,) union index of each of teacher i's labels
    num_union: int
    temperature: float               # τ of the soft teacher weights
    kd_temperature: float            # T of vanilla KD


@dataclass(frozen=True)
class Strategy:
    name: str
    targets: Callable[[TargetInputs], tuple]
    loss: str
    description: str
    score: str = "mc"
    selects: bool = False
    columns: tuple[str, ...] = ()
    needs_gold: bool = False


# ------------------------------------------------------------------ target builders
def hard(x: TargetInputs):
    """The highest-scoring teacher's distribution (MUKI's hard integration)."""
    return hard_targets(x.dists, x.scores, x.positions, x.num_union)


def soft(x: TargetInputs):
    """Σ_i softmax(s/τ)_i · p_i (MUKI's soft integration)."""
    return soft_targets(x.dists, x.scores, x.positions, x.num_union, x.temperature)


def vanilla_kd(x: TargetInputs):
    """softmax(concatenated logits / T); the reported teacher is the highest-scoring one."""
    return vanilla_kd_targets(x.logits, x.positions, x.num_union, x.kd_temperature), x.scores.argmax(1)


def uhc(x: TargetInputs):
    """UHC trains on each teacher's own distribution (losses.UHCLoss); this target is the plain
    average, kept for reporting only."""
    return sum(pad(p, pos, x.num_union) for p, pos in zip(x.dists, x.positions)) / len(x.dists), x.scores.argmax(1)


def oracle(x: TargetInputs):
    """The teacher that owns the gold label (analysis only)."""
    return oracle_targets(x.dists, x.scores, x.gold, x.positions, x.num_union)


def supervised(x: TargetInputs):
    """One-hot gold labels (uniform where unknown); the reported teacher is the oracle's."""
    targets = np.zeros((len(x.gold), x.num_union))
    known = x.gold >= 0
    targets[np.flatnonzero(known), x.gold[known]] = 1.0
    targets[~known] = 1.0 / x.num_union
    return targets, oracle(x)[1]


STRATEGIES = {s.name: s for s in (
    Strategy("muki_soft", soft, "WeightedKLLoss", "MUKI: teachers weighted by softmax(s/τ) of their MC scores.",
             selects=True),
    Strategy("muki_hard", hard, "WeightedKLLoss", "MUKI: the teacher with the highest MC score.", selects=True),
    Strategy("entropy_soft", soft, "WeightedKLLoss", "As muki_soft, on deterministic-softmax entropy scores.",
             score="entropy", selects=True),
    Strategy("entropy_hard", hard, "WeightedKLLoss", "As muki_hard, on deterministic-softmax entropy scores.",
             score="entropy", selects=True),
    Strategy("vanilla_kd", vanilla_kd, "VanillaKDLoss", "KD on softmax(concatenated teacher logits / T)."),
    Strategy("uhc", uhc, "UHCLoss", "Each teacher's distribution against the student's, restricted to its labels.",
             columns=("teacher_probs",)),
    Strategy("oracle", oracle, "WeightedKLLoss", "Bound: the teacher owning the gold label (needs pool gold).",
             needs_gold=True),
    Strategy("supervised", supervised, "SupervisedCELoss", "Bound: cross-entropy on the pool's gold labels.",
             columns=("gold",), needs_gold=True),
)}
SCORE_STRATEGIES = tuple(n for n, s in STRATEGIES.items() if s.selects)


def strategy_scores(strategy: str, probs: Sequence[np.ndarray], mc_score: Sequence[np.ndarray]) -> np.ndarray:
    """(B, N) the per-teacher scores `strategy` compares (its row's `score`)."""
    if STRATEGIES[strategy].score == "entropy":
        return np.stack([entropy_scores(np.asarray(p)) for p in probs], axis=1)
    return np.stack([np.asarray(s, dtype=np.float64) for s in mc_score], axis=1)


def integrate(strategy: str, *, probs, logits, mc_probs, mc_score, positions, num_union: int, temperature: float,
              kd_temperature: float, reweight: bool = True, target_probs: str = "deterministic",
              gold: Optional[np.ndarray] = None, select_scores: Optional[np.ndarray] = None) -> Integrated:
    """One strategy's targets for a batch (integrate.py's module docstring gives the shapes).

    Re-weighting (the top-2 margin of the scores) applies to the selecting strategies; the others
    get weight 1. `weights` are raw: normalize over the pool. select_scores (B, N) replaces a
    selecting strategy's own scores (calibrated or prototype scores).
    """
    row = STRATEGIES[strategy]
    if row.needs_gold and gold is None:
        raise ValueError(f"strategy {strategy!r} needs gold labels on the pool")
    if select_scores is not None and row.selects:
        scores = np.asarray(select_scores, dtype=np.float64)
    else:
        scores = strategy_scores(strategy, probs, mc_score)
    x = TargetInputs(dists=mc_probs if target_probs == "mc_mean" else probs, logits=logits, scores=scores,
                     gold=None if gold is None else np.asarray(gold), positions=positions, num_union=num_union,
                     temperature=temperature, kd_temperature=kd_temperature)
    targets, teacher = row.targets(x)
    weights = margin_weights(scores) if (reweight and row.selects) else np.ones(scores.shape[0])
    return Integrated(targets=targets, weights=weights, teacher=teacher, scores=scores)
