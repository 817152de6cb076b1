"""Growing coverage: add a teacher by config; only it is computed; the student head grows by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import load_file, save_file

from muki_ray.student.checkpoint import growth
from muki_ray.run.cli import main
from muki_ray.config.schema import parse_config
from muki_ray.student.evaluate import predict_proba
from muki_ray.config.labels import LabelSpace
from muki_ray.core.manifest import finish_stage, read_manifest
from muki_ray.run.pipeline import train_stage
from muki_ray.run.report import growth_lines
from tests.conftest import make_tiny_model
from tests.test_student import toy_rows, train_log


def write_cfg(tmp_path, name, teachers, tiny_models, test=False, **student):
    def jsonl(fname, rows):
        p = tmp_path / fname
        if not p.exists():
            p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    spec = {"news": ["business", "politics"], "arts": ["entertainment", "sport", "tech"], "misc": ["tech", "science"]}
    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {"pool": {"source": jsonl("pool.jsonl", toy_rows(40, 0))},
                 "dev": {"source": jsonl("dev.jsonl", toy_rows(8, 1))}},  # no test split: no evaluation pass
        "teachers": [{"name": t, "model": str(tiny_models[t]), "labels": spec[t], "mc": {"samples": 2},
                      "max_length": 16, "resources": {"num_cpus": 0.25}} for t in teachers],
        "integration": {"preset": "paper"},  # the selection recipes are tested in test_prototypes
        "student": {"model": str(tiny_models["student"]), "epochs": 1, "batch_size": 8, "max_length": 16,
                    "resources_per_worker": {"CPU": 0.5}, **student},
    }
    if test:  # an evaluation pass: the grown student's old and new labels are measured
        raw["data"]["test"] = {"source": jsonl("test.jsonl", toy_rows(16, 2))}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_add_a_teacher_recomputes_only_it(tmp_path, tiny_models, ray_session, capsys):
    run = tmp_path / "run"
    a = write_cfg(tmp_path, "a", ["news", "arts"], tiny_models)
    assert main(["run", str(a)]) == 0
    assert read_manifest(run / "predictions")["computed"] == ["news", "arts"]
    old_student = tmp_path / "student_v1"
    shutil.copytree(run / "student", old_student)
    old_labels = list(json.loads((old_student / "config.json").read_text())["id2label"].values())
    assert old_labels == ["business", "politics", "entertainment", "sport", "tech"]

    # Move the old student's weights far from the base model's, so that what the warm start kept shows.
    weights = {k: v + 1.0 if v.is_floating_point() else v
               for k, v in load_file(str(old_student / "model.safetensors")).items()}
    save_file(weights, str(old_student / "model.safetensors"), metadata={"format": "pt"})

    # The warm start runs inside the workers (partitioned under ZeRO-3: test_student.py).
    # head_probe_rows 0: the rows copied by name are checked here; the probe has its own test below.
    b = write_cfg(tmp_path, "b", ["news", "arts", "misc"], tiny_models, test=True, init_from=str(old_student),
                  head_probe_rows=0)
    capsys.readouterr()
    assert main(["diff", str(a), str(b)]) == 0
    plan = capsys.readouterr().out
    assert "predictions: rerun - compute misc (new); reuse news, arts" in plan
    assert "union labels: 5 -> 6 (+science)" in plan

    assert main(["run", str(b)]) == 0
    m = read_manifest(run / "predictions")
    assert m["computed"] == ["misc"] and m["reused"] == ["arts", "news"]  # the first two were not recomputed
    new_labels = list(json.loads((run / "student" / "config.json").read_text())["id2label"].values())
    assert new_labels == old_labels + ["science"]  # the union grew
    # The new student started from the old head rows (by name) and body; one short epoch moved them little.
    new = load_file(str(run / "student" / "model.safetensors"))
    base = load_file(str(tiny_models["student"] / "model.safetensors"))
    for i, name in enumerate(old_labels):
        torch.testing.assert_close(new["classifier.weight"][new_labels.index(name)], weights["classifier.weight"][i],
                                   atol=0.05, rtol=0)
    body = "bert.encoder.layer.0.output.dense.weight"
    torch.testing.assert_close(new[body], weights[body], atol=0.05, rtol=0)
    assert (new[body] - base[body]).abs().mean() > 0.9  # not the base model's body
    assert new["classifier.weight"][-1].abs().max() < 0.5  # science: a fresh row, not a copied one
    warm = next(r for r in train_log(run) if r.get("event") == "warm_start")
    assert warm["new_labels"] == ["science"] and "classifier.weight" in warm["head"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "dev_accuracy" in metrics
    grown = metrics["growth"]  # forgetting measured: the old labels after, the new labels
    assert grown["new_labels"] == ["science"] and grown["new_teachers"] == ["misc"]
    assert grown["old_teachers"] == ["news", "arts"] and 0.0 <= grown["old_labels_accuracy"] <= 1.0
    assert "## Growth (warm start from" in (run / "report.md").read_text()

    # Changing one teacher's mc.samples recomputes only that teacher.
    assert main(["predict-teachers", str(b), "--set", "teachers[0].mc.samples=3"]) == 0
    m = read_manifest(run / "predictions")
    assert m["computed"] == ["news"] and m["reused"] == ["arts", "misc"]


def test_growth_figures_come_from_the_previous_run_and_reach_the_report(tmp_path):
    """A student grown from a 2-teacher run: old labels, new labels and teachers by name; the old
    labels' accuracy before is the previous run's metrics.json, read back into report.md's lines."""
    prev = tmp_path / "prev"
    (prev / "student").mkdir(parents=True)
    (prev / "student" / "config.json").write_text(json.dumps(
        {"id2label": {"0": "business", "1": "politics", "2": "entertainment"}}))
    (prev / "metrics.json").write_text(json.dumps(
        {"test_accuracy": 0.9, "test_accuracy_per_teacher": {"news": 0.95, "arts": 0.8}}))
    space = LabelSpace.from_teachers({"news": ["business", "politics"], "arts": ["entertainment"],
                                      "misc": ["tech", "science"]})
    g = growth(str(prev), space)
    assert g["old_labels"] == ["business", "politics", "entertainment"] and g["new_labels"] == ["tech", "science"]
    assert g["old_teachers"] == ["news", "arts"] and g["new_teachers"] == ["misc"]
    assert g["before"] == {"test_accuracy": 0.9, "test_accuracy_per_teacher": {"news": 0.95, "arts": 0.8}}
    lines = growth_lines({"growth": {**g, "old_labels_accuracy": 0.88, "new_labels_accuracy": 0.4},
                          "test_accuracy_per_teacher": {"news": 0.9, "arts": 0.85, "misc": 0.4}})
    assert "| old labels | 0.9000 | 0.8800 |" in lines and "| new labels | - | 0.4000 |" in lines
    assert "| news's labels (old teacher) | 0.9500 | 0.9000 |" in lines
    assert "| misc's labels (new teacher) | - | 0.4000 |" in lines
    assert growth_lines({"test_accuracy": 0.5}) == []


def targets_run(tmp_path, name, rows, space, student_model, **student):
    """A run directory whose targets are the toy rows' labels (one-hot, softened), ready to train."""
    run = tmp_path / name
    gold = space.encode([r["label"] for r in rows])
    targets = np.eye(len(space.names))[gold] * 0.9 + 0.1 / len(space.names)
    (run / "targets" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
                             "target": [list(t) for t in targets], "weight": [1.0] * len(rows)}),
                   run / "targets" / "data" / "part-0.parquet")
    finish_stage(run / "targets", config_hash="t", inputs={}, rows=len(rows), started=0.0)
    dev = tmp_path / f"dev-{name}.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(24, 1) if r["label"] in space.names))
    raw = {"output_dir": str(run),
           "data": {"pool": {"source": str(dev)}, "dev": {"source": str(dev)}},
           "teachers": [{"name": t, "model": "x", "labels": list(labels)}
                        for t, labels in zip(space.teachers, space.teacher_labels)],
           "integration": {"preset": "paper"},
           "student": {"model": str(student_model), "batch_size": 8, "num_workers": 1, "zero_stage": 2,
                       "resources_per_worker": {"CPU": 0.5}, "max_length": 16, "warmup_ratio": 0.0, **student}}
    return parse_config(raw), run


def test_a_grown_student_learns_its_new_labels(tmp_path, tiny_models, ray_session):
    """A 2-label student grown to 4 labels on a pool where the new labels are 10% of the texts: the
    head probe gives the new labels rows that win their texts, and after a few steps the exported
    student predicts each new label on its texts (the copied head sent every one of them to an old
    label). The steps are tiny (lr 1e-6): a tiny random body's features are too fragile for real
    training to keep what the probe fitted (measured: 25 steps at 1e-4 moved its features by 0.35
    for weight changes of 0.001); benchmarks/grow.py measures real students."""
    old_space = LabelSpace.from_teachers({"news": ["business", "politics"]})
    new_space = LabelSpace.from_teachers({"news": ["business", "politics"], "arts": ["entertainment", "sport"]})
    # The previous student: a 2-label classifier (init_range 0.2: features spread enough for a linear
    # probe to separate the four topics) whose head is confident, as trained students are: +5
    # on both old labels' biases sends every text, the new labels' too, to an old label by a margin a
    # few steps cannot undo (with head_probe_rows=0 this student predicts neither new label).
    previous = make_tiny_model(tmp_path / "previous", old_space.names, "bert", seed=4, init_range=0.2)
    weights = load_file(str(previous / "model.safetensors"))
    weights["classifier.bias"] = weights["classifier.bias"] + 5.0
    save_file(weights, str(previous / "model.safetensors"), metadata={"format": "pt"})
    rows = toy_rows(400, 4)
    pool = [r for r in rows if r["label"] in old_space.names][:180]
    pool += [r for r in rows if r["label"] == "entertainment"][:10] + [r for r in rows if r["label"] == "sport"][:10]
    cfg, run2 = targets_run(tmp_path, "grown", pool, new_space, tiny_models["student"], epochs=1, lr=1e-6,
                            init_from=str(previous))
    train_stage(cfg, new_space, run2)

    probe = read_manifest(run2 / "train")["metrics"]["head_probe"]
    assert probe["rows"] == 200 and probe["before"]["new_label_rows"] == 20
    assert probe["before"]["new_rows_on_new"] == 0.0  # the copied head: every new-label text on an old label
    assert probe["after"]["new_rows_on_new"] >= 0.9 and probe["after"]["new_margin"] > 0, probe
    assert next(r for r in train_log(run2) if r.get("event") == "warm_start")["probed_head"] == \
        ["classifier.bias", "classifier.weight"]
    # The exported student's new rows moved from their fresh init (std 0.02 over 32 features: norm
    # about 0.11), and it predicts each new label on its texts.
    head = load_file(str(run2 / "student" / "model.safetensors"))["classifier.weight"]
    assert head[2:].norm(dim=-1).min() > 0.6
    for lab in ("entertainment", "sport"):
        batch = [r["text"] for r in pool if r["label"] == lab]
        probs, names = predict_proba(run2 / "student", batch, max_length=16)
        assert (np.asarray(names)[probs.argmax(1)] == lab).any(), (lab, probs)
