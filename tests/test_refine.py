"""integration.refine: the self-training math on hand-worked examples, its config errors, and the stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from muki_ray.stages.cache import stage_keys
from muki_ray.config.schema import ConfigError, parse_config
from muki_ray.student.evaluate import predict_proba
from muki_ray.method.integrate import margin_weights
from muki_ray.core.manifest import read_manifest
from muki_ray.run.pipeline import combine_stage
from muki_ray.method.refine import high_margin, margin_cut, refine_scores, teacher_mass
from muki_ray.method.refine import teacher_mass as mass_of
from muki_ray.method.stats import Sketch
from tests.test_combiner import SPACE, fake_predictions, make_cfg

SCORES = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.1], [0.5, 0.5]])  # margins 0.7, 0.7, 0.6, 0.0


def split(scores, fraction):
    return high_margin(scores, margin_cut(Sketch(margin_weights(scores)), fraction))


def test_high_margin_takes_the_widest_margins():
    assert split(SCORES, 0.5).tolist() == [True, True, False, False]
    assert split(SCORES, 0.6).tolist() == [True, True, True, False]  # ceil(0.6 * 4) = 3 rows
    assert split(np.array([[0.5, 0.5], [0.5, 0.5]]), 0.5).tolist() == [True, True]  # texts tied at the cut all train
    assert high_margin(np.zeros((0, 2)), 0.7).tolist() == []


def test_teacher_mass_counts_a_shared_label_for_each_owner():
    p = np.array([[0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_allclose(teacher_mass(p, [np.array([0, 1]), np.array([2, 3])]), [[0.3, 0.7]])
    np.testing.assert_allclose(teacher_mass(p, [np.array([0, 1]), np.array([1, 2, 3])]), [[0.3, 0.9]])


def test_refine_scores_mixes_the_student_into_judged_rows_only():
    scores = np.array([[1.0, 0.0], [0.0, 0.0]])
    judged = np.array([False, True])
    out = refine_scores(scores, np.array([[0.1, 0.9]]), judged, temperature=1.0, student_weight=0.5)
    # Not judged: τ log softmax(s / τ), the same weights and margin (1.0) as s.
    np.testing.assert_allclose(out[0], [1 - math.log(1 + math.e), -math.log(1 + math.e)])
    # Judged: τ log of w = 0.5 * (0.5, 0.5) + 0.5 * (0.1, 0.9) = (0.3, 0.7); the student overrules the tie.
    np.testing.assert_allclose(out[1], np.log([0.3, 0.7]))
    # β = 0 keeps the teachers' weights; β = 1 with a zero mass stays finite.
    np.testing.assert_allclose(refine_scores(scores, np.array([[0.1, 0.9]]), judged, temperature=1.0,
                                             student_weight=0.0)[1], np.log([0.5, 0.5]))
    assert np.isfinite(refine_scores(scores, np.array([[0.0, 1.0]]), judged, temperature=0.2,
                                     student_weight=1.0)).all()
    with pytest.raises(ValueError, match=r"mass has shape \(2, 2\), expected \(1, 2\)"):
        refine_scores(scores, np.ones((2, 2)), judged, temperature=1.0, student_weight=0.5)


def test_refine_needs_a_dev_split(tmp_path):
    with pytest.raises(ConfigError, match=r"integration.refine: .* set data.dev"):
        make_cfg(tmp_path, refine={})
    with pytest.raises(ConfigError, match=r"integration.refine.fraction"):
        make_cfg(tmp_path, refine={"fraction": 1.0})


def test_combiner_stage_with_refine(tmp_path, ray_session, tiny_models):
    fake_predictions(tmp_path)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": f"text {i}", "label": lab}) + "\n"
                           for i, lab in enumerate(["sport", "tech", "business", "politics"])))
    raw = {"output_dir": str(tmp_path),
           "data": {"pool": {"source": str(tmp_path / "unused.jsonl")}, "dev": {"source": str(dev)},
                    "pool_gold_labels": True},
           "teachers": [{"name": "zeta", "model": "z", "labels": ["sport", "tech"]},
                        {"name": "alpha", "model": "a", "labels": ["business", "politics"]}],
           "integration": {"strategy": "muki_soft", "preset": "paper", "refine": {"fraction": 0.5, "student_weight": 1.0, "rounds": 2,
                                                               "resources": {"num_cpus": 0.5}}},
           "student": {"model": str(tiny_models["student"]), "epochs": 1, "batch_size": 2, "lr": 1e-3,
                       "resources_per_worker": {"CPU": 1}}}
    cfg = parse_config(raw)
    off = parse_config({**raw, "integration": {"strategy": "muki_soft", "preset": "paper"}})
    assert stage_keys(cfg, SPACE, tmp_path, "targets")[0] != stage_keys(off, SPACE, tmp_path, "targets")[0]
    combine_stage(cfg, SPACE, tmp_path)

    rows = {r["id"]: r for r in pq.read_table(tmp_path / "targets" / "data").to_pylist()}
    # Round 1 trains on r0, r1 (MC margins 0.7) and judges r2, r3. With β = 1 a judged row's scores
    # are τ log(the first student's teacher masses); those are nearly even (a tiny model after one
    # step), so round 2 splits the same way and judges r2, r3 again.
    stats = read_manifest(tmp_path / "targets")["refine"]
    assert [(s["round"], s["trained_rows"], s["judged_rows"]) for s in stats] == [(1, 2, 2), (2, 2, 2)]
    # r0 (s = (0.9, 0.2)) is never judged: τ log softmax(s / τ), its weights and 0.7 margin unchanged.
    q0 = np.array([1 / (1 + math.exp(-3.5)), 1 / (1 + math.exp(3.5))])
    np.testing.assert_allclose(rows["r0"]["scores"], 0.2 * np.log(q0), atol=1e-5)
    for r in (1, 2):
        probs, names = predict_proba(tmp_path / "targets" / "refine" / f"round{r}", ["text 2", "text 3"])
        assert names == list(SPACE.names)
        mass = mass_of(probs, SPACE.positions)
        if r == 1:  # gold on the judged rows: r2 business (alpha; MC picks zeta), r3 tech (zeta; tie -> zeta)
            assert stats[0]["judged_selection_accuracy_before"] == 0.5
            after = [SPACE.teachers[int(np.argmax(m))] for m in mass]
            assert stats[0]["judged_selection_accuracy_after"] == ((after[0] == "alpha") + (after[1] == "zeta")) / 2
    # The last round's masses make the final scores of r2, r3 and pick their teachers.
    np.testing.assert_allclose([rows["r2"]["scores"], rows["r3"]["scores"]], 0.2 * np.log(mass), atol=1e-4)
    assert [rows["r2"]["teacher"], rows["r3"]["teacher"]] == [SPACE.teachers[int(np.argmax(m))] for m in mass]
