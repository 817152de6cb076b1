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

from muki_ray.stats import Sketch

MARGIN_EPS = 1e-6
CALIBRATIONS = ("none", "zscore", "rank", "share")
SHARE_POINTS = 512        # quantile points of a teacher's score distribution that its share is fitted to
SHARE_SEPARATION = 2.0    # Ashman's D below which a teacher's two score modes are not told apart
SHARE_TOLERANCE = 0.15    # how far from 1 the teachers' independently read shares may sum
SHARE_MIN_MODE = 0.04     # a mode lighter than this is a few outliers, not a share


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


def upper_mode_share(values: np.ndarray, iterations: int = 200) -> Optional[float]:
    """The weight of the upper of two Gaussian modes fitted to values (M,) by EM, or None when the
    two modes are not told apart (Ashman's D = √2 |μ₁ - μ₂| / √(σ₁² + σ₂²) < SHARE_SEPARATION),
    one holds less than SHARE_MIN_MODE of the values, or there are fewer than 8 values. EM starts from Otsu's split (the threshold that maximizes the
    between-class variance), so the fit is deterministic.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    if len(x) < 8 or x[-1] - x[0] < 1e-12:
        return None
    k = np.arange(1, len(x))
    c = np.cumsum(x)
    m0, m1 = c[:-1] / k, (c[-1] - c[:-1]) / (len(x) - k)
    cut = int(np.argmax(k * (len(x) - k) * (m0 - m1) ** 2)) + 1
    w = np.array([cut, len(x) - cut]) / len(x)
    mu = np.array([x[:cut].mean(), x[cut:].mean()])
    floor = 1e-3 * (x[-1] - x[0])
    sd = np.array([x[:cut].std(), x[cut:].std()]) + floor
    for _ in range(iterations):
        dens = w * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) / sd
        r = dens / np.maximum(dens.sum(1, keepdims=True), 1e-300)
        w = r.mean(0)
        mu = (r * x[:, None]).sum(0) / np.maximum(r.sum(0), 1e-300)
        sd = np.sqrt((r * (x[:, None] - mu) ** 2).sum(0) / np.maximum(r.sum(0), 1e-300)) + floor
    if math.sqrt(2.0) * abs(mu[1] - mu[0]) / math.sqrt(sd[0] ** 2 + sd[1] ** 2) < SHARE_SEPARATION:
        return None
    if w.min() < SHARE_MIN_MODE:
        return None
    return float(w[int(np.argmax(mu))])


def pool_shares(sketches: Sequence[Sketch]) -> np.ndarray:
    """(N,) each teacher's estimated share of the pool, summing to 1, from its score sketch.

    Why it works: a teacher scores the texts it owns higher than the others, so over the pool its
    scores form two modes, its own texts above, and the upper mode's weight is its share. The fit
    is per teacher, on its own score scale (log-odds, where confident scores near 1 spread out),
    so an over-confident teacher shifts both of its modes, not its share. Each text has exactly one
    owner, so the N shares read off independently must add up to 1: only when every teacher shows
    two modes and their weights sum to 1 within SHARE_TOLERANCE are they trusted (then normalized).
    Otherwise the modes are not what this assumes (an over-confident teacher scores its own and
    the others' texts alike, one skewed mode, a few outliers) and every teacher gets 1/N, which
    makes `share` the plain `rank`. (Giving a lone undecided teacher the remainder was tried and
    dropped: on the BBC teachers the other teacher's upper mode holds its over-confident foreign
    texts too, so its share reads 0.65-0.91 whatever the truth, 0.05-0.95.)
    """
    n = len(sketches)
    est = []
    for sk in sketches:
        q = np.clip(sk.quantiles(SHARE_POINTS), 1e-12, 1 - 1e-12)
        est.append(upper_mode_share(np.log(q) - np.log1p(-q)) if sk.n else None)
    if n == 0 or any(e is None for e in est) or abs(sum(est) - 1.0) > SHARE_TOLERANCE:
        return np.full(n, 1.0 / max(n, 1))
    return np.array(est) / sum(est)


@dataclass
class Calibration:
    """A pool-level map of each teacher's selection scores, fitted from per-block partials.

    Beyond the paper (#12). Teachers of unequal strength and label count score on different
    scales: in the BBC reproduction teacher t1 averages 0.89 on its own texts and t2 0.89 on texts
    it does not own, so the raw argmax gives t2 90% of the pool (41% is t2's). Comparing each score
    with the same teacher's scores over the pool removes that offset. `zscore`: (s - mean) / std
    per teacher; `rank`: the per-teacher quantile (robust to skewed, saturated scores), from a
    mergeable sketch; `share`: the rank minus the share of the pool the teacher does not own,
    F_i(s) - (1 - π_i), with π_i from `pool_shares`; `none`: s. `fit` one block, `merge` the
    blocks, then `apply` to any block.

    Why `share`: a rank compares teachers as if each owned 1/N of the pool. A teacher owning 80%
    of it has its own texts spread over ranks 0.2-1 and the others' over 0-0.8, so a text of the
    major teacher at rank 0.3 loses to the minor teacher's 0.5. Subtracting 1 - π_i puts every
    teacher's own-versus-foreign boundary at 0; with equal shares it is `rank` (the same argmax).
    """

    method: str
    n: int = 0
    sums: Optional[np.ndarray] = None      # (N,) Σ s
    squares: Optional[np.ndarray] = None   # (N,) Σ s²
    sketches: list = field(default_factory=list)  # per teacher, for `rank` and `share`
    _shares: Optional[np.ndarray] = None          # `share`: π (N,), estimated once after merging

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
        ranks = np.stack([sk.mid_rank(s[:, t]) for t, sk in enumerate(self.sketches)], axis=1)
        return ranks - (1.0 - self.shares) if self.method == "share" else ranks

    @property
    def shares(self) -> np.ndarray:
        """(N,) each teacher's estimated share of the pool (`pool_shares`; equal shares unless
        `share`). Computed once, so a fitted calibration ships to workers with it."""
        if self._shares is None:
            n = len(self.sums) if self.sums is not None else 0
            self._shares = pool_shares(self.sketches) if self.method == "share" and self.n else np.full(n, 1 / max(n, 1))
        return self._shares


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
