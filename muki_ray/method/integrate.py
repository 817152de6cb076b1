"""Integrating N teachers into one target over the union label space (MUKI steps 2-3). Pure numpy.

Per teacher i (lists over teachers; B rows): probs[i] (B, C_i) deterministic softmax, logits[i]
(B, C_i), mc_probs[i] (B, C_i) p̄, mc_score[i] (B,) s = 1 - H(p̄)/log C_i. `positions[i]` (C_i,)
maps teacher i's labels to union indices; a label shared by several teachers has one index and
their contributions to it are added. Outputs: targets (B, |Y|) rows summing to 1, weights (B,),
teacher (B,) the chosen or highest-weight teacher, scores (B, N).

Ties in hard selection go to the teacher listed first (np.argmax's rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from muki_ray.method.stats import Sketch

MARGIN_EPS = 1e-6
CALIBRATIONS = ("none", "zscore", "rank", "share")


@dataclass
class Integrated:
    targets: np.ndarray   # (B, |Y|) float64, rows sum to 1
    weights: np.ndarray   # (B,) raw margin weights (ones when not re-weighting); normalize over the pool
    teacher: np.ndarray   # (B,) int, chosen / highest-weight teacher
    scores: np.ndarray    # (B, N) the scores used for selection


def pad(p: np.ndarray, positions: np.ndarray, num_union: int) -> np.ndarray:
    """(B, C_i) -> (B, |Y|): teacher distribution at its union positions, zeros elsewhere."""
    out = np.zeros((p.shape[0], num_union), dtype=np.float64)
    np.add.at(out, (slice(None), positions), p)  # add.at: repeated positions accumulate
    return out


def entropy(p: np.ndarray) -> np.ndarray:
    """H(p) over the last axis, nats; 0·log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(-1)


def entropy_scores(probs: np.ndarray) -> np.ndarray:
    """Deterministic-pass score s = 1 - H(p)/log C, (B, C) -> (B,) in [0, 1]."""
    c = probs.shape[-1]
    if c < 2:
        raise ValueError(f"a teacher with {c} label(s) has no usable uncertainty (log C = 0)")
    return np.clip(1.0 - entropy(probs) / math.log(c), 0.0, 1.0)


def teacher_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(s / τ) over teachers, (B, N) -> (B, N), numerically stable."""
    z = scores / temperature
    z = z - z.max(axis=1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(axis=1, keepdims=True)


def hard_targets(dists: Sequence[np.ndarray], scores: np.ndarray, positions, num_union: int):
    """i* = argmax_i s_i; target = pad_{i*}(p_{i*}). Returns (targets (B,|Y|), teacher (B,))."""
    choice = scores.argmax(axis=1)
    targets = np.zeros((scores.shape[0], num_union))
    for i, (p, pos) in enumerate(zip(dists, positions)):
        rows = choice == i
        if rows.any():
            targets[rows] = pad(p[rows], pos, num_union)
    return targets, choice


def soft_targets(dists: Sequence[np.ndarray], scores: np.ndarray, positions, num_union: int, temperature: float):
    """w = softmax(s/τ); target = Σ_i w_i pad_i(p_i). Returns (targets, teacher = argmax w)."""
    w = teacher_weights(scores, temperature)
    targets = sum(w[:, i:i + 1] * pad(p, pos, num_union) for i, (p, pos) in enumerate(zip(dists, positions)))
    return targets, w.argmax(axis=1)


def margin_weights(scores: np.ndarray) -> np.ndarray:
    """m = s_(1) - s_(2) + 1e-6, the gap between the top-2 teacher scores, (B, N) -> (B,)."""
    if scores.shape[1] < 2:
        return np.ones(scores.shape[0])
    top2 = np.sort(scores, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] + MARGIN_EPS


def normalize_weights(w: np.ndarray, mean: Optional[float] = None) -> np.ndarray:
    """Scale weights to mean 1 over the pool (`mean` = the pool mean when w is one batch)."""
    m = float(np.mean(w)) if mean is None else float(mean)
    return w / m if m > 0 else np.ones_like(w)


def vanilla_kd_targets(logits: Sequence[np.ndarray], positions, num_union: int, kd_temperature: float):
    """softmax(concat(logits) / T) over the concatenated teacher labels (Σ C_i entries).

    Mass of a label shared by several teachers is summed onto its union index, so the result
    lives in the union space; with disjoint teachers it equals the concatenation.
    """
    concat = np.concatenate(logits, axis=1) / kd_temperature
    concat = concat - concat.max(axis=1, keepdims=True)
    p = np.exp(concat)
    p /= p.sum(axis=1, keepdims=True)
    return pad(p, np.concatenate(positions), num_union)


def oracle_targets(dists: Sequence[np.ndarray], scores: np.ndarray, gold: np.ndarray, positions, num_union: int):
    """The teacher that owns the gold label (several owners: the highest-scoring); analysis only.

    Rows with unknown gold (-1) fall back to the highest-scoring teacher.
    """
    owns = np.zeros((len(gold), len(dists)), dtype=bool)
    for i, pos in enumerate(positions):
        owns[:, i] = np.isin(gold, pos)
    masked = np.where(owns, scores, -np.inf)
    masked = np.where(owns.any(axis=1, keepdims=True), masked, scores)
    return hard_targets(dists, masked, positions, num_union)


def standardize(scores: np.ndarray) -> np.ndarray:
    """(B, N) -> (B, N) z-scores per teacher over the pool; a constant column becomes 0."""
    return Calibration.fit("zscore", scores).apply(scores)


def quantile_ranks(scores: np.ndarray) -> np.ndarray:
    """(B, N) -> (B, N) per-teacher mid-rank quantiles (rank + 0.5) / B in (0, 1); ties share their mean rank."""
    return Calibration.fit("rank", scores).apply(scores)


@dataclass
class Calibration:
    """A pool-level map of each teacher's selection scores, fitted from per-block partials.

    Beyond the paper (#12). Teachers of unequal strength and label count score on different
    scales: in the BBC reproduction teacher t1 averages 0.89 on its own texts and t2 0.89 on texts
    it does not own, so the raw argmax gives t2 90% of the pool (41% is t2's). Comparing each score
    with the same teacher's scores over the pool removes that offset. `zscore`: (s - mean) / std
    per teacher; `rank`: the per-teacher quantile (robust to skewed, saturated scores), from a
    mergeable sketch; `share`: the same ranks, which the combiner then turns into owner
    posteriors with the teachers' estimated shares of the pool (`owners.py`, over the prototypes'
    embedding clusters); `none`: s. `fit` one block, `merge` the blocks, then `apply` to any block.

    A rank alone compares teachers as if each owned 1/N of the pool: a teacher owning 5% of it
    has its foreign texts over ranks 0-0.95 and wins about half of the other teachers' texts.
    That is what `share` corrects.
    """

    method: str
    n: int = 0
    sums: Optional[np.ndarray] = None      # (N,) Σ s
    squares: Optional[np.ndarray] = None   # (N,) Σ s²
    sketches: list = field(default_factory=list)  # per teacher, for `rank` and `share`

    @classmethod
    def fit(cls, method: str, scores: np.ndarray) -> "Calibration":
        """The partial of one block of scores (B, N)."""
        if method not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {method!r}")
        s = np.asarray(scores, dtype=np.float64)
        return cls(method, n=s.shape[0], sums=s.sum(0), squares=np.square(s).sum(0),
                   sketches=[Sketch(s[:, t]) for t in range(s.shape[1])] if method in ("rank", "share") else [])

    def merge(self, other: "Calibration") -> "Calibration":
        return Calibration(self.method, self.n + other.n, self.sums + other.sums, self.squares + other.squares,
                           [a.merge(b) for a, b in zip(self.sketches, other.sketches)])

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """(B, N) -> (B, N) calibrated scores; an empty pool leaves them unchanged."""
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "none" or self.n == 0 or s.shape[0] == 0:
            return s
        if self.method == "zscore":
            mean = self.sums / self.n
            std = np.sqrt(np.maximum(self.squares / self.n - mean ** 2, 0.0))
            return (s - mean) / np.where(std > 1e-12, std, 1.0)
        return np.stack([sk.mid_rank(s[:, t]) for t, sk in enumerate(self.sketches)], axis=1)


def calibrate(scores: np.ndarray, method: str) -> np.ndarray:
    """`Calibration` fitted on `scores` (B, N) as the whole pool, applied to them."""
    return Calibration.fit(method, scores).apply(scores)


def selection_counts(scores: np.ndarray, dists: Sequence[np.ndarray], positions, num_union: int,
                     gold: np.ndarray) -> dict:
    """Sums behind `selection_quality` for one block (they add up over blocks)."""
    gold = np.asarray(gold)
    known = gold >= 0
    targets, teacher = hard_targets(dists, scores, positions, num_union)
    owns = np.stack([np.isin(gold, pos) for pos in positions], axis=1)
    ok = owns[np.arange(len(gold)), teacher] & known
    wrong = ~owns[np.arange(len(gold)), teacher] & known
    margin = margin_weights(scores)
    return {"rows": int(known.sum()), "target_ok": int(((targets.argmax(1) == gold) & known).sum()),
            "selected_ok": int(ok.sum()), "margin_correct": float(margin[ok].sum()),
            "margin_wrong": float(margin[wrong].sum()), "wrong": int(wrong.sum())}


def quality_from_counts(c: dict) -> dict:
    """`selection_quality` from (summed) `selection_counts`."""
    def ratio(a, b):
        return float(a / b) if b else float("nan")

    return {"rows": c["rows"], "target_accuracy": ratio(c["target_ok"], c["rows"]),
            "selection_accuracy": ratio(c["selected_ok"], c["rows"]),
            "mean_margin_correct": ratio(c["margin_correct"], c["selected_ok"]),
            "mean_margin_wrong": ratio(c["margin_wrong"], c["wrong"])}


def selection_quality(scores: np.ndarray, dists: Sequence[np.ndarray], positions, num_union: int,
                      gold: np.ndarray) -> dict:
    """Hard selection by `scores` (B, N) judged against gold union indices (B,); -1 rows ignored.

    target_accuracy: argmax of the selected teacher's padded distribution == gold.
    selection_accuracy: the selected teacher owns the gold label.
    mean_margin_correct / _wrong: mean raw margin on correct / wrong selections.
    """
    return quality_from_counts(selection_counts(scores, dists, positions, num_union, gold))
