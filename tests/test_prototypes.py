"""Label prototypes (integration.prototypes): hand-worked math, then the combiner stage with them on."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from muki_ray.stages.cache import stage_keys
from muki_ray.run.pipeline import combine_stage
from muki_ray.method.prototypes import owner_weights, prototype_scores, refine, seed_responsibilities, standardize, teacher_scores
from tests.test_combiner import SPACE, fake_predictions, make_cfg, read_targets


def test_standardize_per_teacher_and_constant_column():
    z = standardize(np.array([[1.0, 0.3], [3.0, 0.3]]))
    np.testing.assert_allclose(z, [[-1.0, 0.0], [1.0, 0.0]])


def test_seed_responsibilities_hand_example():
    # Equal z: each teacher gets weight 1/2, spread over its labels by its own probabilities.
    resp = seed_responsibilities(owner_weights(np.zeros((1, 2)), tau=1.0), [np.array([[0.8, 0.2]]),
                                 np.array([[0.6, 0.4]])], [np.array([0, 1]), np.array([2, 3])], 4)
    np.testing.assert_allclose(resp, [[0.4, 0.1, 0.3, 0.2]])


def test_teacher_scores_hand_example():
    # cos = [1, 0] to the two prototypes; softmax with kappa = 1: e/(e+1) = 0.7311.
    s = teacher_scores(np.array([[1.0, 0.0]]), np.eye(2), [np.array([0]), np.array([1])], kappa=1.0)
    np.testing.assert_allclose(s, [[0.7310586, 0.2689414]], atol=1e-6)


def test_refine_moves_prototypes_to_the_groups():
    emb = np.array([[1.0, 0.0], [0.9, 0.436], [0.0, 1.0], [0.6, 0.8]])
    # Seeds slightly wrong: row 1 leans to label 1. After one round it joins row 0's group.
    resp = np.array([[1.0, 0.0], [0.4, 0.6], [0.0, 1.0], [0.0, 1.0]])
    protos, assign = refine(emb, resp, iterations=10)
    assert assign.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(protos[0], np.array([1.9, 0.436]) / np.hypot(1.9, 0.436), atol=1e-6)
    np.testing.assert_allclose(protos[1], np.array([0.6, 1.8]) / np.hypot(0.6, 1.8), atol=1e-6)


def test_an_overlapping_label_collects_every_owners_weight():
    """Teachers A {x, y} and B {y, z} share y. Equal scores: w = (0.5, 0.5). Row: A says (0.2, 0.8),
    B says (0.6, 0.4), so x = 0.1, y = 0.4 + 0.3 = 0.7, z = 0.2; the row sums to 1."""
    seeds = seed_responsibilities(owner_weights(np.zeros((1, 2)), tau=1.0), [np.array([[0.2, 0.8]]),
                                  np.array([[0.6, 0.4]])], [np.array([0, 1]), np.array([1, 2])], 3)
    np.testing.assert_allclose(seeds, [[0.1, 0.7, 0.2]])
    np.testing.assert_allclose(seeds.sum(1), 1.0)


def test_a_label_that_wins_no_text_keeps_its_prototype():
    emb = np.eye(2)
    resp = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])  # label 2 seeded halfway: cos 0.707 < 1 everywhere
    protos, assign = refine(emb, resp, iterations=5)
    assert assign.tolist() == [0, 1]
    np.testing.assert_allclose(protos[2], [2 ** -0.5, 2 ** -0.5])


def test_prototypes_overrule_a_misleading_score():
    """Two groups in embedding space; on row 2 the wrong teacher looks more certain."""
    emb = np.array([[1.0, 0.05], [1.0, -0.05], [1.0, 0.0], [0.05, 1.0], [-0.05, 1.0], [0.0, 1.0]])
    scores = np.array([[0.8, 0.2], [0.7, 0.3], [0.5, 0.9], [0.1, 0.9], [0.2, 0.8], [0.3, 0.7]])
    dists = [np.tile([0.9, 0.1], (6, 1)), np.tile([0.1, 0.9], (6, 1))]
    positions = [np.array([0, 1]), np.array([2, 3])]
    assert scores.argmax(1).tolist() == [0, 0, 1, 1, 1, 1]  # uncertainty alone gets row 2 wrong
    s = prototype_scores(emb, scores, dists, positions, 4)
    assert s.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(s.sum(1), 1.0)  # the teachers' labels partition the union
    assert prototype_scores(np.zeros((0, 2)), np.zeros((0, 2)), [np.zeros((0, 2))] * 2, positions, 4).shape == (0, 2)


def test_combiner_stage_with_prototypes(tmp_path, ray_session, tiny_models):
    fake_predictions(tmp_path)
    plain = make_cfg(tmp_path, strategy="muki_hard", reweight=False)
    cfg = make_cfg(tmp_path, strategy="muki_hard", reweight=False,
                   prototypes={"model": str(tiny_models["news"]), "resources": {"num_cpus": 0.5}})
    assert stage_keys(cfg, SPACE, tmp_path, "targets")[0] != stage_keys(plain, SPACE, tmp_path, "targets")[0]
    combine_stage(cfg, SPACE, tmp_path)
    rows = pq.read_table(tmp_path / "targets" / "data").to_pylist()
    assert len(rows) == 4
    for r in rows:
        # Prototype scores are label-posterior masses: they sum to 1 over the teachers (MC scores do not).
        assert abs(sum(r["scores"]) - 1.0) < 1e-5
        assert r["teacher"] == ["zeta", "alpha"][int(np.argmax(r["scores"]))]
        assert abs(sum(r["target"]) - 1.0) < 1e-5
    report = json.loads((tmp_path / "supervision.json").read_text())
    assert 0.0 <= report["selection_accuracy"] <= 1.0 and "mc" in report


def test_combiner_stage_with_rank_calibration(tmp_path, ray_session):
    fake_predictions(tmp_path)
    plain = make_cfg(tmp_path, strategy="muki_hard", reweight=False)
    cfg = make_cfg(tmp_path, strategy="muki_hard", reweight=False, calibration="rank")
    assert stage_keys(cfg, SPACE, tmp_path, "targets")[0] != stage_keys(plain, SPACE, tmp_path, "targets")[0]
    combine_stage(cfg, SPACE, tmp_path)
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "targets" / "data").to_pylist()}
    # zeta's MC scores [0.9, 0.1, 0.7, 0.5] and alpha's [0.2, 0.8, 0.1, 0.5] as pool quantiles (rank + 0.5) / 4
    expected = {"r0": [0.875, 0.375], "r1": [0.125, 0.875], "r2": [0.625, 0.125], "r3": [0.375, 0.625]}
    for rid, scores in expected.items():
        np.testing.assert_allclose(rows[rid]["scores"], scores, atol=1e-6)
    # r3 is a raw tie (0.5, 0.5) that goes to zeta; its ranks give it to alpha.
    assert [rows[f"r{i}"]["teacher"] for i in range(4)] == ["zeta", "alpha", "zeta", "alpha"]


def test_combiner_stage_with_share_calibration(tmp_path, ray_session, tiny_models):
    """Share calibration + prototypes runs the owners' model in the stream: the manifest and
    supervision.json carry its estimated shares, per teacher."""
    fake_predictions(tmp_path)
    cfg = make_cfg(tmp_path, preset="default", calibration="share", strategy="muki_hard", reweight=False,
                   prototypes={"model": str(tiny_models["news"]), "resources": {"num_cpus": 0.5}})
    assert cfg.integration.calibration == "share"
    info = combine_stage(cfg, SPACE, tmp_path)
    assert info["shares_from"] == "owners"
    assert set(info["estimated_shares"]) == {"zeta", "alpha"}
    assert sum(info["estimated_shares"].values()) == pytest.approx(1.0)
    report = json.loads((tmp_path / "supervision.json").read_text())
    for t in ("zeta", "alpha"):
        assert report["per_teacher"][t]["estimated_share"] == info["estimated_shares"][t]
    assert len(read_targets(tmp_path)) == 4
