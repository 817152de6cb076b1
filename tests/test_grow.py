"""Growing coverage: add a teacher by config; only it is computed; the student head grows by name."""

from __future__ import annotations

import json
import shutil

import torch
import yaml
from safetensors.torch import load_file, save_file

from muki_ray.cli import main
from muki_ray.manifest import read_manifest
from tests.test_student import toy_rows, train_log


def write_cfg(tmp_path, name, teachers, tiny_models, **student):
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
    b = write_cfg(tmp_path, "b", ["news", "arts", "misc"], tiny_models, init_from=str(old_student))
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
    assert "dev_accuracy" in json.loads((run / "metrics.json").read_text())

    # Changing one teacher's mc.samples recomputes only that teacher.
    assert main(["predict-teachers", str(b), "--set", "teachers[0].mc.samples=3"]) == 0
    m = read_manifest(run / "predictions")
    assert m["computed"] == ["news"] and m["reused"] == ["arts", "misc"]
