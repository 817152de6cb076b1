"""The teacher stage: one Ray Data pipeline and actor pool per teacher, one row per pool id, heterogeneous teachers."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.data

from muki_ray.method import mc_dropout
from muki_ray.stages.cache import teacher_key
from muki_ray.run.cli import main
from muki_ray.config.schema import ConfigError, parse_config
from muki_ray.config.labels import LabelSpace
from muki_ray.core.manifest import read_manifest
from muki_ray.config.preflight import check_config
from muki_ray.core.stage import COLUMNS, column, stage_class, stage_options
from muki_ray.stages.teachers import TeacherSpec, TeacherStage, teacher_specs
from tests.conftest import WORDS


def _cfg(tmp_path, tiny_models, n=300, replicas=2, **teacher_extra):
    rng = np.random.default_rng(0)
    pool = tmp_path / "pool.jsonl"
    with open(pool, "w") as f:
        for i in range(n):
            words = rng.choice(WORDS, size=rng.integers(2, 30))
            f.write(json.dumps({"id": f"doc{i}", "text": " ".join(words)}) + "\n")
    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {"pool": {"source": str(pool)}},
        "teachers": [
            {"name": "news", "model": str(tiny_models["news"]), "batch_size": 64, "mc": {"samples": 3},
             "resources": {"num_cpus": 0.25, "replicas": replicas}, **teacher_extra},
            {"name": "arts", "model": str(tiny_models["arts"]), "batch_size": 50, "mc": {"samples": 2},
             "resources": {"num_cpus": 0.25}},
            {"name": "misc", "model": str(tiny_models["misc"]), "batch_size": 40, "mc": {"samples": 2},
             "resources": {"num_cpus": 0.25}},
        ],
        "student": {"model": str(tiny_models["student"])},
    }
    (tmp_path / "cfg.yaml").write_text(__import__("yaml").safe_dump(raw))
    cfg = check_config(parse_config(raw))
    space = LabelSpace.from_teachers({"news": ["business", "politics"], "arts": ["entertainment", "sport", "tech"],
                                      "misc": ["tech", "science"]})
    return cfg, space


def test_three_heterogeneous_teachers_one_row_per_id(tmp_path, tiny_models, ray_session):
    cfg, space = _cfg(tmp_path, tiny_models)
    assert main(["predict-teachers", str(tmp_path / "cfg.yaml")]) == 0
    pool = read_manifest(tmp_path / "run" / "pool")
    assert sum(1 for n in pool["bucket_rows"] if n) > 8  # the pool streams as many blocks
    manifest = read_manifest(tmp_path / "run" / "predictions")
    table = pq.read_table(tmp_path / "run" / "predictions" / "data")
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(f"doc{i}" for i in range(300))  # no loss, no duplicates
    assert manifest["rows"] == 300
    for name, c in [("news", 2), ("arts", 3), ("misc", 2)]:
        probs = np.stack(table.column(column(name, "probs")).to_numpy(zero_copy_only=False))
        mc = np.stack(table.column(column(name, "mc_probs")).to_numpy(zero_copy_only=False))
        assert probs.shape == (300, c) and mc.shape == (300, c)
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
        np.testing.assert_allclose(mc.sum(1), 1, atol=1e-5)
        score = table.column(column(name, "mc_score")).to_numpy()
        assert ((score >= -1e-6) & (score <= 1 + 1e-6)).all()
        for field in ("entropy", "mc_uncertainty", "mc_score"):  # float64 end to end (mc_dropout.MCOutput)
            assert table.schema.field(column(name, field)).type == "double"
    # Rows keep their own predictions: recompute a few ids in-process and compare.
    spec = teacher_specs(cfg, space)[1]
    stage = TeacherStage(spec)
    rows = table.slice(0, 5).to_pylist()
    direct = stage.predict([r["text"] for r in rows])
    np.testing.assert_allclose(np.stack(direct["probs"]), np.stack([r["arts__probs"] for r in rows]), atol=1e-5)


def test_stage_output_is_a_plain_callable_with_teacher_columns(tiny_models):
    spec = TeacherSpec(name="news", model_path=str(tiny_models["news"]), labels=("business", "politics"),
                       samples=4, dropout=0.2)
    stage = TeacherStage(spec)
    texts = np.array(["market stock", "vote", "the election minister party " * 8, "a"], dtype=object)
    out = stage({"id": np.arange(4), "text": texts})
    assert set(column("news", f) for f in COLUMNS) <= set(out)
    # Length sorting must not scramble rows: each row equals its own single-row prediction.
    for i, text in enumerate(texts):
        alone = stage.predict([text])
        np.testing.assert_allclose(out["news__logits"][i], alone["logits"][0], atol=1e-5)


def test_forward_budget_defaults_by_device_and_bounds_each_forward(tiny_models, monkeypatch):
    spec = TeacherSpec(name="news", model_path=str(tiny_models["news"]), labels=("business", "politics"), samples=4)
    assert TeacherStage(spec).max_batch_tokens == 2048  # CPU default (hardware.mc_batch_tokens)
    stage = TeacherStage(replace(spec, max_batch_tokens=64))
    sizes = []
    real = mc_dropout._logits
    monkeypatch.setattr(mc_dropout, "_logits", lambda m, b, d: sizes.append(b["input_ids"].numel()) or real(m, b, d))
    stage.predict(["market stock vote election minister"] * 3 + ["a"])
    assert max(sizes) <= 64 and len(sizes) > 2  # every forward, deterministic or sampled, within the budget


def test_head_size_mismatch_names_the_teacher(tiny_models):
    spec = TeacherSpec(name="arts", model_path=str(tiny_models["arts"]), labels=("a", "b"))
    with pytest.raises(ValueError, match="teacher 'arts': model head has 3 outputs but 2 labels"):
        TeacherStage(spec)


def test_stage_class_named_after_teacher():
    cls = stage_class("news", TeacherStage)
    assert cls.__name__ == "news" and issubclass(cls, TeacherStage)


def test_resources_reach_actor_pool_options(tmp_path, tiny_models):
    """Configured num_gpus/num_cpus/replicas/custom resources reach each pool's options (no GPU needed)."""
    cfg, space = _cfg(tmp_path, tiny_models, n=4, replicas=3)
    cfg.teachers[1].resources.num_gpus = 1
    cfg.teachers[2].resources.custom = {"teacher_slot": 1.0}
    news, arts, misc = (stage_options(t.resources, 0.0) for t in cfg.teachers)
    assert news["num_cpus"] == 0.25 and news["num_gpus"] == 0.0
    assert isinstance(news["compute"], ray.data.ActorPoolStrategy)
    assert (news["compute"].min_size, news["compute"].max_size) == (1, 3)  # grows and shrinks within replicas
    assert stage_options(cfg.teachers[0].resources, 0.0, actors=2)["compute"].max_size == 2  # the scheduler's grant
    assert arts["num_gpus"] == 1 and misc["resources"] == {"teacher_slot": 1.0} and "resources" not in news
    # On a GPU cluster, an unset num_gpus defaults to one GPU per teacher actor.
    assert [stage_options(t.resources, 1.0)["num_gpus"] for t in cfg.teachers] == [1.0, 1, 1.0]


def test_cheaper_mc_options_reach_the_stage_and_its_cache_key(tmp_path, tiny_models):
    cfg, space = _cfg(tmp_path, tiny_models, n=4, mc={"samples": 8, "dropout": 0.3, "layers": 1, "adaptive": True,
                                                      "adaptive_tolerance": 0.5, "adaptive_round": 2})
    spec = teacher_specs(cfg, space)[0]
    assert (spec.layers, spec.adaptive) == (1, (0.5, 2))
    stage = TeacherStage(spec)
    out = stage.predict(["market stock vote", "election", "a b c d", "minister"])
    assert 4 * 2 <= stage.passes < 4 * 8  # some rows stopped before K = 8
    assert np.allclose([p.sum() for p in out["mc_probs"]], 1.0, atol=1e-5)
    (tmp_path / "b").mkdir()
    exact, _ = _cfg(tmp_path / "b", tiny_models, n=4, mc={"samples": 8, "dropout": 0.3})
    assert teacher_key(cfg, space, 0) != teacher_key(exact, space, 0)
    assert teacher_key(cfg, space, 1) == teacher_key(exact, space, 1)  # the other teachers keep their caches


def test_mc_layers_deeper_than_the_model_is_a_config_error(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match=r"teachers\[0\].mc.layers: 9 but the model has \d+ layers"):
        _cfg(tmp_path, tiny_models, n=4, mc={"samples": 2, "layers": 9})


def test_a_rows_mc_estimate_does_not_depend_on_its_batch(tiny_models):
    """Masks are seeded per row (mc.seed, teacher, id): the same row in three batch compositions,
    with other neighbours, other padding and other micro-batch splits, gets the same p̄."""
    spec = TeacherSpec(name="news", model_path=str(tiny_models["news"]), labels=("business", "politics"), samples=4)
    stage = TeacherStage(spec)
    row = "market stock bank profit the election"
    alone = stage.predict([row], ids=["r"])["mc_probs"][0]
    crowd = stage.predict(["vote", row, "film music star award show " * 4], ids=["a", "r", "b"])["mc_probs"][1]
    split = TeacherStage(replace(spec, max_batch_tokens=8)).predict(["a b", "the", row], ids=["c", "d", "r"])
    np.testing.assert_array_equal(alone, crowd)
    np.testing.assert_array_equal(alone, split["mc_probs"][2])
    other = stage.predict([row, row], ids=["r", "s"])["mc_probs"]
    assert not np.allclose(other[0], other[1])  # another id draws other masks
    empty = stage.predict([], ids=[])
    assert all(len(v) == 0 for v in empty.values())
