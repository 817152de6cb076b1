"""`muki-ray run` end to end on tiny models: outputs, report, resume and skip logic, classify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest
import yaml

from muki_ray.run.cli import main
from muki_ray.config.schema import parse_config
from muki_ray.data.sources import hashed_sample, to_ray_dataset
from muki_ray.config.labels import label_space
from muki_ray.core.manifest import read_manifest
from muki_ray.run.pipeline import prepare_stage
from tests.conftest import make_tiny_model
from tests.test_student import toy_rows


@pytest.fixture
def run_config(tmp_path):
    def jsonl(name, rows):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    base = make_tiny_model(tmp_path / "base", ["x", "y"], "bert", seed=7, hidden_dropout=0.1)
    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {"pool": {"source": jsonl("train.jsonl", toy_rows(96, 0)), "part": [0.5, 1.0]},
                 "dev": {"source": jsonl("dev.jsonl", toy_rows(16, 1))},
                 "test": {"source": jsonl("test.jsonl", toy_rows(20, 2))},
                 "pool_gold_labels": True},
        "prepare": {"data": {"source": str(tmp_path / "train.jsonl"), "part": [0.0, 0.5]},
                    "test": {"source": str(tmp_path / "test.jsonl")},
                    "model": str(base), "epochs": 1, "batch_size": 8, "lr": 5e-3, "max_length": 16,
                    "resources_per_worker": {"CPU": 0.5}},
        "teachers": [{"name": "first", "mc": {"samples": 3}, "max_length": 16, "resources": {"num_cpus": 0.25}},
                     {"name": "second", "mc": {"samples": 3}, "max_length": 16, "resources": {"num_cpus": 0.25}}],
        # no integration section: the default recipe (rank calibration + label prototypes)
        "student": {"model": str(base), "epochs": 1, "batch_size": 8, "lr": 5e-3, "max_length": 16,
                    "resources_per_worker": {"CPU": 0.5}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, tmp_path / "run"


def stage_ids(run):
    return {s: (read_manifest(run / s) or {}).get("output_id")
            for s in ("pool", "prepare", "predictions", "targets", "train", "evaluate")}


NOISE = ("core_worker.cc", "LOAD REPORT", "UserWarning", "Traceback", "gcs_server", "FutureWarning")


def test_run_end_to_end_resume_and_classify(run_config, ray_session, capsys):
    cfg_path, run = run_config
    # The first run as a user's: the CLI in its own process, output captured (not a terminal).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "muki_ray.run.cli", "run", str(cfg_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    screen = proc.stdout + proc.stderr
    assert proc.returncode == 0, screen
    lines = screen.splitlines()
    assert len(lines) <= 60, screen
    for stage in ("pool", "prepare", "predictions", "targets", "train", "evaluate"):
        assert any(f"{stage:<12} started" in line for line in lines), (stage, screen)
        assert any(f"{stage:<12} done in" in line for line in lines), (stage, screen)
    assert "test accuracy (union)" in proc.stdout
    assert not [n for n in NOISE if n in screen] and "Token authentication" not in screen, screen  # (Ray's, at init)
    (log_file,) = (run / "logs").glob("run-*.log")  # the full log, Ray's and the workers' lines included
    full = log_file.read_text()
    assert "ray.workers" in full and "RayTrainWorker" in full and len(full.splitlines()) > 3 * len(lines)
    for path in ["prepare/first/config.json", "prepare/second/config.json", "predictions/data", "targets/data",
                 "student/config.json", "metrics.json", "report.md", "supervision.json", "uncertainty.png",
                 "training.png"]:
        assert (run / path).exists(), path
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test_accuracy" in metrics and set(metrics["test_accuracy_per_teacher"]) == {"first", "second"}
    report = (run / "report.md").read_text()
    assert "| first |" in report and "| second |" in report and "Supervision quality" in report
    assert "| teacher selection | rank calibration + label prototypes |" in report
    assert "![training curves](training.png)" in report and f"({log_file.relative_to(run)})" in report
    teacher_cfg = json.loads((run / "prepare" / "first" / "config.json").read_text())
    assert list(teacher_cfg["id2label"].values()) == ["business", "entertainment"]  # sorted slice 1
    # The two teachers trained side by side (0.5 CPU each on 2 CPUs): each started before the other ended.
    schedule = read_manifest(run / "prepare")["schedule"]
    assert set(schedule) == {"first", "second"}
    assert max(s["start"] for s in schedule.values()) < min(s["end"] for s in schedule.values()), schedule
    first = stage_ids(run)

    # An identical rerun skips every stage; --verbose shows Ray's own lines too.
    capsys.readouterr()
    assert main(["--verbose", "run", str(cfg_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("up to date (skipped)") == 6  # pool, prepare, predictions, targets, train, evaluate
    assert " ray.data" in err or " ray." in err, err
    assert stage_ids(run) == first

    # (Which stages a config change reruns is tested for many keys in test_scale.py; a stage whose
    # manifest is missing, a crash, is recomputed from scratch in test_faults.py.)
    # --force reruns one stage (and what depends on it).
    capsys.readouterr()
    assert main(["run", str(cfg_path), "--force", "evaluate"]) == 0
    assert stage_ids(run)["evaluate"] != first["evaluate"] and stage_ids(run)["train"] == first["train"]

    # The student names union labels.
    capsys.readouterr()
    assert main(["classify", "--model", str(run / "student"), "market stock bank", "film music star"]) == 0
    labels = [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert len(labels) == 2 and set(labels) <= {"business", "entertainment", "politics", "sport"}


def test_bad_force_stage(run_config, capsys):
    cfg_path, _ = run_config
    assert main(["run", str(cfg_path), "--force", "nope"]) == 2
    assert "--force: unknown stage 'nope'" in capsys.readouterr().err


def test_per_teacher_prepare_settings_and_unowned_labels(tmp_path, tiny_models, ray_session):
    """A prepared teacher's own base model, epochs, lr and text count override `prepare`; texts of
    labels no teacher owns are skipped and counted, not refused."""
    rows = toy_rows(48, 0)  # business, entertainment, politics, sport in turn
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(8, 1) if r["label"] in ("business", "entertainment")))
    base = make_tiny_model(tmp_path / "base", ["x", "y"], "bert", seed=7)
    cfg = parse_config({
        "output_dir": str(tmp_path / "run"),
        "data": {"pool": {"source": str(tmp_path / "pool.jsonl")}, "dev": {"source": str(dev)}},
        "prepare": {"data": {"source": str(data)}, "model": str(base), "split": "explicit", "epochs": 2,
                    "max_length": 16, "resources_per_worker": {"CPU": 0.5}},
        "teachers": [{"name": "first", "labels": ["business", "entertainment"],
                      "prepare": {"model": str(tiny_models["arts"]), "epochs": 1, "lr": 1e-3, "texts": 7}},
                     {"name": "own", "model": str(tiny_models["misc"]), "labels": ["tech", "science"]}],
        "student": {"model": str(base)}})
    space = label_space(cfg)
    m = prepare_stage(cfg, space, tmp_path / "run")
    first = m["teachers"]["first"]
    assert (first["train_rows"], first["epochs"], first["lr"]) == (7, 1, 1e-3)
    assert first["base_model"] == str(tiny_models["arts"]) and "own" not in m["teachers"]
    assert m["skipped_unowned"] == {"politics": 12, "sport": 12}
    exported = json.loads((tmp_path / "run" / "prepare" / "first" / "config.json").read_text())
    assert exported["model_type"] == "roberta" and list(exported["id2label"].values()) == ["business", "entertainment"]

    # The sample is exactly n rows, the same whatever the blocks.
    table = pa.table({"id": [f"r{i}" for i in range(50)], "text": ["t"] * 50})
    picks = [sorted(hashed_sample(to_ray_dataset(table, rows_per_block=k), 9, "s").to_pandas()["id"]) for k in (4, 50)]
    assert len(picks[0]) == 9 and picks[0] == picks[1]
    assert hashed_sample(to_ray_dataset(table, rows_per_block=8), 80, "s").count() == 50
