"""The warm start's head probe (head_probe.py) against hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import torch

from muki_ray.student.head_probe import fit_head, label_balance, probe_report, soft_kl


def test_the_probe_fits_the_targets_log_odds():
    """Two texts with features +1 and -1; targets (0.1, 0.9) and (0.9, 0.1). Without the L2 pull the
    optimum is the one whose logit gap (new - old) is ln 9 · h: softmax gives back the targets."""
    h = np.array([[1.0], [-1.0]])
    t = np.array([[0.1, 0.9], [0.9, 0.1]])
    fit = fit_head(h, t, np.ones(2), np.zeros((2, 1)), np.zeros(2), np.array([False, True]), l2=0.0,
                   balance=False)
    gap = (fit.weight[1] - fit.weight[0])[0]
    assert abs(gap - math.log(9)) < 1e-3 and abs(fit.bias[1] - fit.bias[0]) < 1e-3
    logits = h @ fit.weight.T + fit.bias
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), t, atol=1e-3)
    b, a = fit.report["before"], fit.report["after"]
    # Before: the new row is 0, a tie goes to the old label (argmax takes the first): no new-label text won.
    assert b["new_label_rows"] == 1 and b["new_rows_on_new"] == 0.0 and b["new_margin"] == 0.0
    assert a["new_rows_on_new"] == 1.0 and abs(a["new_margin"] - math.log(9)) < 1e-3
    assert b["agreement"] == 0.5 and a["agreement"] == 1.0
    assert b["row_norm_new"] == 0.0 and abs(a["row_norm_new"] - abs(fit.weight[1, 0])) < 1e-6


def test_the_pull_keeps_a_head_the_targets_agree_with():
    """An old head that already gives the targets is the optimum: the probe leaves it where it is;
    a weight of 0 on every row leaves only the pull, so the fit is the starting head."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(50, 4))
    w0, b0 = rng.normal(size=(3, 4)), rng.normal(size=3)
    logits = h @ w0.T + b0
    t = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    new = np.array([False, False, True])
    fit = fit_head(h, t, np.ones(50), w0, b0, new, balance=False)
    np.testing.assert_allclose(fit.weight, w0, atol=1e-3)
    np.testing.assert_allclose(fit.bias, b0, atol=1e-3)
    idle = fit_head(h, t, np.zeros(50), w0 + 1.0, b0, new)
    np.testing.assert_allclose(idle.weight, w0 + 1.0, atol=1e-5)


def test_soft_kl_and_the_report_by_hand():
    """KL((1,0) ‖ softmax(0, 0)) = ln 2, weighted by 2 and averaged over 2 rows (the other weighs 0)."""
    logits = torch.zeros(2, 2, dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    assert abs(float(soft_kl(logits, t, torch.tensor([2.0, 0.0], dtype=torch.float64))) - math.log(2)) < 1e-12
    rep = probe_report(torch.tensor([[2.0, 1.0, 3.0]], dtype=torch.float64),
                       torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64),
                       torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]], dtype=torch.float64), [False, False, True])
    assert rep == {"agreement": 1.0, "new_label_rows": 1, "new_rows_on_new": 1.0, "new_margin": 1.0,
                   "row_norm_old": 3.0, "row_norm_new": 2.0}


def test_every_target_label_weighs_the_same_in_the_probe():
    """Rows of labels 0, 0, 0, 1 (argmax): β = 4 / (2 x 3) for the first three and 4 / (2 x 1) for
    the last, so each label weighs 2 in all; label 2, absent, takes no share."""
    t = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1]])
    np.testing.assert_allclose(label_balance(t), [2 / 3, 2 / 3, 2 / 3, 2.0])
    assert label_balance(np.zeros((0, 3))).shape == (0,)


def test_balance_lets_a_rare_new_label_win_its_rows():
    """A new label on 5 of 100 rows, its texts 1 unit from the old label's along one feature (and a
    shared offset of 3 elsewhere); old head: +4 bias. Unbalanced, the pull keeps the new label below
    the old one on its own rows; balanced, it wins them, and the old rows stay old."""
    rng = np.random.default_rng(1)
    h = np.concatenate([np.c_[np.full(95, 3.0), rng.normal(0, 0.1, 95)],
                        np.c_[np.full(5, 3.0), 1 + rng.normal(0, 0.1, 5)]])
    t = np.zeros((100, 2))
    t[:95, 0], t[95:, 1] = 1.0, 1.0
    t = t * 0.9 + 0.05
    w0, b0, new = np.zeros((2, 2)), np.array([4.0, 0.0]), np.array([False, True])
    plain = fit_head(h, t, np.ones(100), w0, b0, new, balance=False, l2=0.5).report["after"]
    fair = fit_head(h, t, np.ones(100), w0, b0, new, l2=0.5).report["after"]
    assert plain["new_rows_on_new"] == 0.0 and plain["new_margin"] < 0  # measured: -0.51
    assert fair["new_rows_on_new"] == 1.0 and fair["new_margin"] > 1.0  # measured: +1.74
    assert fair["agreement"] == 1.0
