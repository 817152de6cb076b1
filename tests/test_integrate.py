"""Integration strategies against hand-worked numbers (2 and 3 teachers, overlaps, order, ties)."""

from __future__ import annotations

import numpy as np
import pytest

import muki_ray.method.losses as losses
from muki_ray.config.schema import IntegrationConfig
from muki_ray.method.integrate import (
    Calibration,
    calibrate,
    entropy_scores,
    hard_targets,
    margin_weights,
    normalize_weights,
    pad,
    quantile_ranks,
    selection_quality,
    soft_targets,
    teacher_weights,
    vanilla_kd_targets,
)
from muki_ray.method.strategies import STRATEGIES, integrate

# Two teachers: T1 owns union [a, b] (0, 1), T2 owns [c, d, e] (2, 3, 4).
POS = [np.array([0, 1]), np.array([2, 3, 4])]
P1 = np.array([[0.9, 0.1], [0.5, 0.5]])
P2 = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
S = [np.array([0.8, 0.1]), np.array([0.3, 0.6])]  # MC scores
L1 = np.array([[2.0, 0.0], [0.0, 0.0]])
L2 = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


def run(strategy, **kw):
    args = dict(probs=[P1, P2], logits=[L1, L2], mc_probs=[P1, P2], mc_score=S, positions=POS, num_union=5,
                temperature=0.2, kd_temperature=5.0)
    args.update(kw)
    return integrate(strategy, **args)


def test_muki_hard():
    out = run("muki_hard")
    np.testing.assert_allclose(out.targets, [[0.9, 0.1, 0, 0, 0], [0, 0, 0.1, 0.1, 0.8]])
    assert out.teacher.tolist() == [0, 1]
    np.testing.assert_allclose(out.weights, [0.5 + 1e-6, 0.5 + 1e-6])


def test_muki_soft_tau_0_2():
    out = run("muki_soft", temperature=0.2)
    # w = softmax([0.8, 0.3] / 0.2) = [1/(1+e^-2.5), ...] = [0.924142, 0.075858]
    np.testing.assert_allclose(out.targets[0], [0.831728, 0.092414, 0.015172, 0.022757, 0.037929], atol=1e-6)
    assert out.teacher.tolist() == [0, 1]


def test_entropy_strategies_use_deterministic_scores():
    # s1 = 1 - H([.9,.1])/ln2 = 0.531004, s2 = 1 - H([.2,.3,.5])/ln3 = 0.062769 (row 0)
    # s1 = 0, s2 = 1 - H([.1,.1,.8])/ln3 = 0.418328 (row 1)
    np.testing.assert_allclose(entropy_scores(P1), [0.531004, 0.0], atol=1e-6)
    np.testing.assert_allclose(entropy_scores(P2), [0.062769, 0.418328], atol=1e-6)
    hard = run("entropy_hard")
    assert hard.teacher.tolist() == [0, 1]
    np.testing.assert_allclose(hard.weights, [0.468235 + 1e-6, 0.418328 + 1e-6], atol=1e-6)
    # Entropy scores disagree with MC scores when the MC scores say otherwise.
    flipped = run("entropy_hard", mc_score=[np.array([0.1, 0.9]), np.array([0.9, 0.1])])
    assert flipped.teacher.tolist() == [0, 1]
    assert run("muki_hard", mc_score=[np.array([0.1, 0.9]), np.array([0.9, 0.1])]).teacher.tolist() == [1, 0]
    soft = run("entropy_soft", temperature=0.2)
    w = 1 / (1 + np.exp(-(0.531004 - 0.062769) / 0.2))
    np.testing.assert_allclose(soft.targets[0, :2], np.array([0.9, 0.1]) * w, atol=1e-5)


def test_vanilla_kd_temperature():
    t1 = run("vanilla_kd", kd_temperature=1.0)
    np.testing.assert_allclose(t1.targets[0], [0.563734, 0.076293, 0.076293, 0.076293, 0.207386], atol=1e-6)
    t2 = run("vanilla_kd", kd_temperature=2.0)
    np.testing.assert_allclose(t2.targets[0], [0.368981, 0.135740, 0.135740, 0.135740, 0.223798], atol=1e-6)
    np.testing.assert_allclose(t1.targets[1], np.full(5, 0.2))
    np.testing.assert_allclose(t1.weights, 1.0)


def test_uhc_reporting_target_and_oracle_and_supervised():
    np.testing.assert_allclose(run("uhc").targets[0], [0.45, 0.05, 0.1, 0.15, 0.25])
    gold = np.array([3, -1])  # row 0: gold 'd' owned by T2 although T1 scores higher
    oracle = run("oracle", gold=gold)
    np.testing.assert_allclose(oracle.targets[0], [0, 0, 0.2, 0.3, 0.5])
    assert oracle.teacher.tolist() == [1, 1]  # unknown gold falls back to the best score
    sup = run("supervised", gold=gold)
    np.testing.assert_allclose(sup.targets[0], [0, 0, 0, 1, 0])
    np.testing.assert_allclose(sup.targets[1], np.full(5, 0.2))
    with pytest.raises(ValueError, match="needs gold labels"):
        run("oracle")


def test_target_probs_mc_mean():
    mc1 = np.array([[0.6, 0.4], [0.5, 0.5]])
    out = run("muki_hard", mc_probs=[mc1, P2], target_probs="mc_mean")
    np.testing.assert_allclose(out.targets[0], [0.6, 0.4, 0, 0, 0])
    assert run("muki_hard", mc_probs=[mc1, P2]).targets[0, 0] == pytest.approx(0.9)


def test_three_teachers_soft_and_margin():
    pos = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    dists = [np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]
    scores = np.array([[0.2, 0.9, 0.85]])
    w = teacher_weights(scores, 0.2)
    np.testing.assert_allclose(w, [[0.016693, 0.552792, 0.430515]], atol=1e-6)
    targets, teacher = soft_targets(dists, scores, pos, 6, 0.2)
    np.testing.assert_allclose(targets, [[0.008346, 0.008346, 0.552792, 0, 0, 0.430515]], atol=1e-6)
    assert teacher.tolist() == [1]
    np.testing.assert_allclose(margin_weights(scores), [0.05 + 1e-6])
    hard, t = hard_targets(dists, scores, pos, 6)
    np.testing.assert_allclose(hard, [[0, 0, 1, 0, 0, 0]])


def test_soft_limits():
    scores = np.array([[0.8, 0.3], [0.1, 0.6]])
    hard, _ = hard_targets([P1, P2], scores, POS, 5)
    cold, _ = soft_targets([P1, P2], scores, POS, 5, 1e-4)
    np.testing.assert_allclose(cold, hard, atol=1e-9)
    np.testing.assert_allclose(teacher_weights(scores, 1e4), 0.5, atol=1e-4)


def test_ties_go_to_first_teacher():
    scores = np.array([[0.5, 0.5]])
    _, teacher = hard_targets([P1[:1], P2[:1]], scores, POS, 5)
    assert teacher.tolist() == [0]
    np.testing.assert_allclose(margin_weights(scores), [1e-6])
    np.testing.assert_allclose(teacher_weights(scores, 0.2), [[0.5, 0.5]])


def test_overlapping_labels_add_up():
    pos = [np.array([0, 1]), np.array([1, 2])]  # union [x, s, y]; 's' shared
    dists = [np.array([[0.6, 0.4]]), np.array([[0.3, 0.7]])]
    targets, _ = soft_targets(dists, np.array([[0.5, 0.5]]), pos, 3, 0.2)
    np.testing.assert_allclose(targets, [[0.3, 0.35, 0.35]])
    np.testing.assert_allclose(pad(np.array([[0.25, 0.75]]), np.array([1, 1]), 2), [[0.0, 1.0]])
    kd = vanilla_kd_targets([np.zeros((1, 2)), np.zeros((1, 2))], pos, 3, 1.0)
    np.testing.assert_allclose(kd, [[0.25, 0.5, 0.25]])


def test_label_space_order_respected():
    # T1's labels sit at union 3 and 0 (listed out of order); T2 at 1 and 2.
    pos = [np.array([3, 0]), np.array([1, 2])]
    targets, _ = hard_targets([np.array([[0.7, 0.3]]), np.array([[0.5, 0.5]])], np.array([[0.9, 0.1]]), pos, 4)
    np.testing.assert_allclose(targets, [[0.3, 0, 0, 0.7]])


def test_normalized_weights_mean_one():
    w = np.array([0.1, 0.3, 0.2])
    np.testing.assert_allclose(normalize_weights(w), [0.5, 1.5, 1.0])
    np.testing.assert_allclose(normalize_weights(w, mean=0.4), [0.25, 0.75, 0.5])
    np.testing.assert_allclose(normalize_weights(np.zeros(2)), [1, 1])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_targets_sum_to_one_on_random_inputs(strategy):
    rng = np.random.default_rng(0)
    pos = [np.array([0, 1, 2]), np.array([2, 3]), np.array([4, 5, 6, 0])]
    logits = [rng.normal(size=(50, len(p))) for p in pos]
    probs = [np.exp(x) / np.exp(x).sum(1, keepdims=True) for x in logits]
    scores = [rng.random(50) for _ in pos]
    out = integrate(strategy, probs=probs, logits=logits, mc_probs=probs, mc_score=scores, positions=pos,
                    num_union=7, temperature=0.2, kd_temperature=5.0, gold=rng.integers(-1, 7, size=50))
    np.testing.assert_allclose(out.targets.sum(1), 1.0, atol=1e-9)
    assert (out.targets >= 0).all() and out.weights.shape == (50,) and (out.weights > 0).all()


def test_selection_quality_hand_example():
    q = selection_quality(np.stack(S, axis=1), [P1, P2], POS, 5, np.array([0, 2]))
    assert q["selection_accuracy"] == 1.0
    assert q["target_accuracy"] == 0.5  # row 1's target argmax is 'e', gold 'c'
    assert q["mean_margin_correct"] == pytest.approx(0.5 + 1e-6)
    q = selection_quality(np.stack(S, axis=1), [P1, P2], POS, 5, np.array([2, -1]))
    assert q["rows"] == 1 and q["selection_accuracy"] == 0.0
    assert q["mean_margin_wrong"] == pytest.approx(0.5 + 1e-6)


def test_quantile_ranks_share_ties():
    r = quantile_ranks(np.array([[0.5, 1.0], [0.1, 2.0], [0.5, 3.0], [0.9, 4.0]]))
    # column 0 sorted: 0.1 | 0.5 0.5 (ranks 1, 2 -> 1.5) | 0.9; quantile = (rank + 0.5) / 4
    np.testing.assert_allclose(r[:, 0], [0.5, 0.125, 0.5, 0.875])
    np.testing.assert_allclose(r[:, 1], [0.125, 0.375, 0.625, 0.875])


@pytest.mark.parametrize("method", ["zscore", "rank"])
def test_calibration_removes_a_teachers_offset(method):
    # Rows 0-1 belong to teacher A, rows 2-3 to B; B scores 0.1 higher everywhere, so raw argmax picks B.
    s = np.array([[0.88, 0.89], [0.89, 0.90], [0.80, 0.99], [0.79, 0.98]])
    assert s.argmax(1).tolist() == [1, 1, 1, 1]
    assert calibrate(s, method).argmax(1).tolist() == [0, 0, 1, 1]


def test_share_calibration_gives_pool_ranks():
    """`share` calibrates like `rank`; the shares enter after, in the owners' model (test_owners.py)."""
    s = np.random.default_rng(1).random((50, 2))
    cal = Calibration.fit("share", s[:20]).merge(Calibration.fit("share", s[20:]))  # two blocks
    np.testing.assert_allclose(cal.apply(s), calibrate(s, "rank"))


def test_calibration_none_empty_and_unknown():
    s = np.array([[0.2, 0.4]])
    np.testing.assert_array_equal(calibrate(s, "none"), s)
    assert calibrate(np.zeros((0, 3)), "rank").shape == (0, 3)
    np.testing.assert_array_equal(calibrate(np.array([[0.3, 0.3], [0.3, 0.3]]), "zscore"), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="calibration must be one of"):
        calibrate(s, "platt")


def test_every_strategy_row_is_complete():
    """Each row names a loss class with the one call shape, a known score kind and known extra
    columns, and the schema accepts the strategy."""
    for name, row in STRATEGIES.items():
        assert issubclass(getattr(losses, row.loss), losses.StudentLoss), name
        assert row.score in ("mc", "entropy") and set(row.columns) <= {"teacher_probs", "gold"}, name
        assert IntegrationConfig(strategy=name).strategy == name
    assert [n for n, r in STRATEGIES.items() if r.needs_gold] == ["oracle", "supervised"]
