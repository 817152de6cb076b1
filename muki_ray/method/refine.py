"""Confidence-thresholded self-training: re-select the teacher of low-margin texts. Pure numpy.

Beyond the paper (issue #12). Why it should work: where the teachers' scores leave a wide margin
the selection is nearly always right (BBC reproduction with prototypes: 0.97 on all texts), and
a student fine-tuned on those texts learns which union labels the *text* looks like. That is a
different kind of evidence from any one teacher's confidence. On the low-margin rest it is a
second opinion; where it and the teachers' scores disagree, their mixture decides.

One round: split the pool by the top-2 margin of the current scores (at the margin that a quantile
sketch of the pool's margins puts `fraction` of the texts above), train a first student on the
high-margin part, let it judge the low-margin rest only, and mix. The first student never
judges a text it was trained on, so no cross-fitting is needed; a later round re-splits by the
refined margin and trains a fresh first student on the new high-margin part.

Shapes: B texts, N teachers, Y union labels.
"""

from __future__ import annotations

import math

import numpy as np

from muki_ray.method.integrate import margin_weights, teacher_weights
from muki_ray.method.stats import Sketch

TINY = 1e-12  # floor of a teacher weight before its log


def margin_cut(margins: Sketch, fraction: float) -> float:
    """The margin m* such that the ceil(fraction * n) texts of widest margin have m >= m*.

    margins: a sketch of the pool's top-2 margins (n values). Texts tied at m* all train.
    """
    return margins.value_at_top(min(margins.n, math.ceil(fraction * margins.n)))


def high_margin(scores: np.ndarray, cut: float) -> np.ndarray:
    """(B, N) -> (B,) bool: the rows whose top-2 margin reaches `cut` (they train the first student)."""
    return margin_weights(scores) >= cut


def teacher_mass(student_probs: np.ndarray, positions) -> np.ndarray:
    """(B, Y) student distribution -> (B, N): its mass over each teacher's union labels.

    A label shared by several teachers counts for each of them, so rows sum to >= 1.
    """
    p = np.asarray(student_probs, dtype=np.float64)
    return np.stack([p[:, np.asarray(pos)].sum(axis=1) for pos in positions], axis=1)


def refine_scores(scores: np.ndarray, mass: np.ndarray, judged: np.ndarray, *, temperature: float,
                  student_weight: float) -> np.ndarray:
    """Refined selection scores (B, N), on the scale of `scores`.

    scores (B, N) any selection scores; mass (J, N) the first student's `teacher_mass` on the
    rows where `judged` (B,) bool is True, in pool order. A judged row's teacher weights become
    w = (1 - β) softmax(s / τ) + β mass (β = student_weight), returned as the scores τ log w, so
    that softmax(scores / τ) = w / Σw and the top-2 margin is in the units of s. Other rows
    are shifted by a constant, s - τ logsumexp(s / τ): the same weights, choice and margin, so
    β = 0 changes nothing.
    """
    s = np.asarray(scores, dtype=np.float64)
    judged = np.asarray(judged, dtype=bool)
    if mass.shape != (int(judged.sum()), s.shape[1]):
        raise ValueError(f"mass has shape {mass.shape}, expected ({int(judged.sum())}, {s.shape[1]})")
    q = teacher_weights(s, temperature)
    w = (1.0 - student_weight) * q[judged] + student_weight * np.asarray(mass, dtype=np.float64)
    out = temperature * np.log(np.clip(q, TINY, None))
    out[judged] = temperature * np.log(np.clip(w, TINY, None))  # clip: β = 1 with a zero mass
    return out
