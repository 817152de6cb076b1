"""Config validation: every error is one line starting with its YAML path, exit code 2."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from muki_ray.stages.cache import config_key
from muki_ray.run.cli import main
from muki_ray.config.schema import ConfigError
from muki_ray.config.config_file import apply_overrides, load_config
from muki_ray.config.labels import contiguous_split, label_space
from muki_ray.config.schema_doc import schema_markdown
from tests.conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base(tmp_path, tiny_models):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps({"text": f"market {i}", "label": "business"}) for i in range(4)) + "\n")
    return {
        "output_dir": str(tmp_path / "run"),
        "data": {"pool": {"source": str(pool)}, "dev": {"source": str(pool)}},
        "teachers": [
            {"name": "news", "model": str(tiny_models["news"])},
            {"name": "arts", "model": str(tiny_models["arts"])},
        ],
        "student": {"model": str(tiny_models["student"])},
    }


def write(tmp_path, raw) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_valid_config_summary(tmp_path, base, capsys):
    code, out, err = run_cli(capsys, "validate", write(tmp_path, base))
    assert code == 0, err
    assert "news: 2 labels" in out and "arts: 3 labels" in out
    # union in teacher order with owners
    assert "business" in out and "<- news" in out and "<- arts" in out
    assert "union label space: 5 labels from 2 teachers" in out


def test_default_recipe_paper_preset_and_non_score_strategies(tmp_path, base, capsys):
    cfg = load_config(write(tmp_path, base))  # no integration section: the default recipe
    assert cfg.integration.calibration == "rank" and cfg.integration.prototypes is not None
    assert cfg.integration.prototypes.model is None  # embeds with student.model
    paper = load_config(write(tmp_path, {**base, "integration": {"preset": "paper"}}))
    assert paper.integration.calibration == "none" and paper.integration.prototypes is None
    assert paper.integration.selection() == "raw scores (the paper's MUKI)"
    mixed = load_config(write(tmp_path, {**base, "integration": {"preset": "paper", "calibration": "zscore"}}))
    assert mixed.integration.calibration == "zscore" and mixed.integration.prototypes is None  # explicit wins
    off = load_config(write(tmp_path, {**base, "integration": {"prototypes": None}}))
    assert off.integration.calibration == "rank" and off.integration.prototypes is None
    with pytest.raises(ConfigError, match="calibration: share estimates the teachers' shares"):
        load_config(write(tmp_path, {**base, "integration": {"calibration": "share", "prototypes": None}}))

    # A non-score strategy ignores the selection options instead of refusing them; run and diff
    # key it exactly like the same strategy without them.
    kd = {**base, "integration": {"strategy": "vanilla_kd", "calibration": "rank", "prototypes": {}, "refine": {}}}
    code, out, err = run_cli(capsys, "validate", write(tmp_path, kd))
    assert code == 0, err
    assert "note: vanilla_kd ignores integration.calibration, integration.prototypes, integration.refine" in out
    a = load_config(write(tmp_path, kd))
    b = load_config(write(tmp_path, {**base, "integration": {"strategy": "vanilla_kd"}}))
    assert (a.integration.calibration, a.integration.prototypes, a.integration.refine) == ("none", None, None)
    assert b.integration.ignored == []
    assert config_key(a, label_space(a), "targets") == config_key(b, label_space(b), "targets")


def test_teacher_prepare_settings_need_a_prepared_teacher(tmp_path, base):
    base["teachers"][0]["prepare"] = {"epochs": 1}
    with pytest.raises(ConfigError, match=r"teachers\[0\].prepare: only a prepared teacher"):
        load_config(write(tmp_path, base))


def test_overlap_marked(tmp_path, base, tiny_models, capsys):
    base["teachers"].append({"name": "misc", "model": str(tiny_models["misc"])})
    code, out, _ = run_cli(capsys, "validate", write(tmp_path, base))
    assert code == 0
    assert "union label space: 6 labels from 3 teachers" in out
    line = next(line for line in out.splitlines() if " tech " in line)
    assert "arts, misc" in line and "(overlap)" in line


def test_explicit_names_override_generic_label_names(tmp_path, base, capsys):
    base["teachers"][0]["model"] = str(make_tiny_model(tmp_path / "generic", ["LABEL_0", "LABEL_1"]))
    base["teachers"][0]["labels"] = ["pos", "neg"]  # refused without them: tests/test_bad_inputs.py
    code, _, err = run_cli(capsys, "validate", write(tmp_path, base))
    assert code == 0, err


def test_every_error_reported_at_once(tmp_path, base, capsys):
    base["integration"] = {"temperature": 0}
    base["student"]["zero_stage"] = 7
    code, _, err = run_cli(capsys, "validate", write(tmp_path, base))
    assert code == 2
    assert "integration.temperature" in err and "student.zero_stage" in err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in err


def test_overrides(tmp_path, base, capsys):
    cfg = load_config(write(tmp_path, base), ["integration.strategy=muki_hard", "teachers[1].mc.samples=4"])
    assert cfg.integration.strategy == "muki_hard" and cfg.teachers[1].mc.samples == 4
    code, _, err = run_cli(capsys, "validate", write(tmp_path, base), "--set", "integration.temperature=-1")
    assert code == 2 and "integration.temperature: must be > 0" in err
    code, _, err = run_cli(capsys, "validate", write(tmp_path, base), "--set", "teachers[5].name=x")
    assert code == 2 and "--set teachers[5].name=x" in err
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])


def test_relative_paths_resolve_against_yaml(tmp_path, base, tiny_models):
    shutil.copytree(tiny_models["news"], tmp_path / "cfgdir" / "m")
    base["teachers"][0]["model"] = "m"
    p = tmp_path / "cfgdir" / "c.yaml"
    p.write_text(yaml.safe_dump(base))
    cfg = load_config(p)
    assert Path(cfg.teachers[0].model) == (tmp_path / "cfgdir" / "m").resolve()


def test_prepare_overlap_refused(tmp_path, base, tiny_models, capsys):
    raw = copy.deepcopy(base)
    raw["data"]["pool"] = {"source": "bbc_news", "split": "train", "part": [0.4, 1.0]}
    raw["prepare"] = {"data": {"source": "bbc_news", "split": "train", "part": [0.0, 0.5]},
                      "model": str(tiny_models["student"])}
    for t in raw["teachers"]:
        del t["model"]
    code, _, err = run_cli(capsys, "validate", write(tmp_path, raw))
    assert code == 2 and "prepare.data.part: overlaps data.pool.part" in err


def test_contiguous_split_rule():
    assert contiguous_split(["tech", "business", "sport", "politics", "entertainment"], 2) == [
        ["business", "entertainment", "politics"], ["sport", "tech"]]
    assert contiguous_split(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e"], ["f", "g"]]


def test_schema_documents_every_option():
    md = schema_markdown()
    for key in ["teachers[].mc.samples", "integration.reweight_normalize", "student.zero_stage",
                "data.pool.part", "ray.object_store_memory", "prepare.split"]:
        assert f"`{key}`" in md


def test_the_schema_doc_is_current():
    doc = (REPO / "docs" / "config.md").read_text()
    assert schema_markdown() in doc, "docs/config.md's schema is stale: run `muki-ray schema --update docs/config.md`"


def test_demo_config_validates(capsys):
    code, out, err = run_cli(capsys, "validate", str(REPO / "jobs/configs/demo.yaml"))
    assert code == 0, err
    assert "teacher_a: 3 labels" in out and "teacher_b: 2 labels" in out
    assert "selection: rank calibration + label prototypes" in out  # the demo runs the default recipe
    assert "union label space: 5 labels from 2 teachers" in out


def test_console_script_exit_codes(tmp_path):
    exe = Path(sys.executable).parent / "muki-ray"
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: 3\n")
    r = subprocess.run([str(exe), "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: teachers:" in r.stderr
