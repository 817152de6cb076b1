"""The combiner stage on hand-made prediction files: schema, row count, label order, report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muki_ray.config.schema import parse_config
from muki_ray.config.labels import LabelSpace
from muki_ray.core.manifest import finish_stage
from muki_ray.run.pipeline import combine_stage
from muki_ray.run.report import stage_headline


def fake_predictions(run_dir, with_gold=True):
    """Teacher 'zeta' owns [sport, tech], 'alpha' owns [business, politics]; union in teacher order."""
    zeta_p = np.array([[0.9, 0.1], [0.5, 0.5], [0.3, 0.7], [0.6, 0.4]])
    alpha_p = np.array([[0.5, 0.5], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    zeta_s = np.array([0.9, 0.1, 0.7, 0.5])
    alpha_s = np.array([0.2, 0.8, 0.1, 0.5])
    cols = {"id": [f"r{i}" for i in range(4)], "text": [f"text {i}" for i in range(4)]}
    if with_gold:
        cols["label"] = ["sport", "politics", "business", "tech"]
    for name, p, s in [("zeta", zeta_p, zeta_s), ("alpha", alpha_p, alpha_s)]:
        cols[f"{name}__logits"] = [list(np.log(r)) for r in p]
        cols[f"{name}__probs"] = [list(r) for r in p]
        cols[f"{name}__entropy"] = list(-(p * np.log(p)).sum(1))
        cols[f"{name}__mc_probs"] = [list(r) for r in p]
        cols[f"{name}__mc_uncertainty"] = list((1 - s) * np.log(2))
        cols[f"{name}__mc_score"] = list(s)
    out = run_dir / "predictions" / "data"
    out.mkdir(parents=True)
    pq.write_table(pa.table(cols), out / "part-0.parquet")
    finish_stage(run_dir / "predictions", config_hash="x", inputs={}, rows=4, started=0.0)


def make_cfg(tmp_path, **integration):
    """A combiner config; the paper's preset unless given, so the hand-worked numbers hold."""
    integration = {"preset": "paper", **integration}
    raw = {
        "output_dir": str(tmp_path),
        "data": {"pool": {"source": str(tmp_path / "unused.jsonl")}, "pool_gold_labels": True},
        "teachers": [{"name": "zeta", "model": "z", "labels": ["sport", "tech"]},
                     {"name": "alpha", "model": "a", "labels": ["business", "politics"]}],
        "integration": integration,
        "student": {"model": "s"},
    }
    return parse_config(raw)


SPACE = LabelSpace.from_teachers({"zeta": ["sport", "tech"], "alpha": ["business", "politics"]})


def read_targets(run_dir):
    t = pq.read_table(run_dir / "targets" / "data").to_pylist()
    return {r["id"]: r for r in t}


def test_hard_targets_schema_order_and_report(tmp_path, ray_session):
    fake_predictions(tmp_path)
    info = combine_stage(make_cfg(tmp_path, strategy="muki_hard", reweight=False), SPACE, tmp_path)
    rows = read_targets(tmp_path)
    assert info["rows"] == 4 and len(rows) == 4
    assert set(rows["r0"]) == {"id", "text", "target", "weight", "teacher", "scores"}
    np.testing.assert_allclose(rows["r0"]["target"], [0.9, 0.1, 0, 0], atol=1e-6)  # zeta wins, union order
    np.testing.assert_allclose(rows["r1"]["target"], [0, 0, 0.2, 0.8], atol=1e-6)  # alpha wins
    assert rows["r1"]["teacher"] == "alpha" and rows["r0"]["teacher"] == "zeta"
    np.testing.assert_allclose(rows["r2"]["scores"], [0.7, 0.1], atol=1e-6)
    assert rows["r3"]["teacher"] == "zeta"  # tie -> the teacher listed first
    assert all(r["weight"] == 1.0 for r in rows.values())
    # Gold: sport (zeta), politics (alpha), business (alpha, but zeta chosen), tech (zeta).
    report = json.loads((tmp_path / "supervision.json").read_text())
    assert report["selection_accuracy"] == 0.75
    assert report["target_accuracy"] == 0.5  # r0 sport ok, r1 politics ok, r2 -> tech, r3 -> sport
    assert report["mc"]["selection_accuracy"] == 0.75
    assert "entropy" in report
    # Per teacher: zeta owns r0, r3 and is chosen for r0, r2, r3; alpha owns r1, r2, chosen for r1.
    per = report["per_teacher"]
    assert (per["zeta"]["recall"], per["zeta"]["precision"]) == (1.0, pytest.approx(2 / 3))
    assert (per["alpha"]["recall"], per["alpha"]["precision"]) == (0.5, 1.0)
    assert per["zeta"]["true_share"] == per["alpha"]["true_share"] == 0.5
    # Without the owners' model a teacher's estimated share is its share of the selections (no gold).
    assert info["estimated_shares"] == {"zeta": 0.75, "alpha": 0.25} and info["shares_from"] == "selections"
    assert per["zeta"]["estimated_share"] == 0.75
    assert "weakest recall alpha 0.500" in stage_headline("targets", info, make_cfg(tmp_path, strategy="muki_hard"))


def test_soft_with_normalized_margins(tmp_path, ray_session):
    fake_predictions(tmp_path)
    combine_stage(make_cfg(tmp_path, strategy="muki_soft", temperature=0.2), SPACE, tmp_path)
    rows = read_targets(tmp_path)
    raw = np.array([0.7, 0.7, 0.6, 0.0]) + 1e-6
    weights = np.array([rows[f"r{i}"]["weight"] for i in range(4)])
    np.testing.assert_allclose(weights, raw / raw.mean(), rtol=1e-5)
    assert weights.mean() == pytest.approx(1.0, rel=1e-5)
    for r in rows.values():
        assert sum(r["target"]) == pytest.approx(1.0, abs=1e-5)


def test_uhc_passes_teacher_probs_and_supervised_passes_gold(tmp_path, ray_session):
    fake_predictions(tmp_path)
    combine_stage(make_cfg(tmp_path, strategy="uhc"), SPACE, tmp_path)
    rows = read_targets(tmp_path)
    np.testing.assert_allclose(rows["r1"]["alpha__probs"], [0.2, 0.8], atol=1e-6)
    combine_stage(make_cfg(tmp_path, strategy="supervised"), SPACE, tmp_path)
    rows = read_targets(tmp_path)
    assert [rows[f"r{i}"]["gold"] for i in range(4)] == [0, 3, 2, 1]


def test_combine_without_predictions_is_a_clear_error(tmp_path, ray_session):
    with pytest.raises(FileNotFoundError, match="no complete predictions"):
        combine_stage(make_cfg(tmp_path), SPACE, tmp_path)
