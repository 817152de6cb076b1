"""`jobs/configs/own_teachers.yaml`, the README's example for a user's own HF folders and JSONL pool:
it validates as written, and runs end to end on tiny models placed where it expects them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from muki_ray.run.cli import main
from tests.conftest import make_tiny_model
from tests.test_student import toy_rows

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "own_teachers.yaml"
UNION = {"business", "entertainment", "politics", "sport", "tech"}


@pytest.fixture
def own_teachers(tmp_path):
    """The example's folder layout in tmp_path: its YAML, two tiny teachers and a JSONL pool, dev and test."""
    shutil.copy(CONFIG, tmp_path / CONFIG.name)
    make_tiny_model(tmp_path / "models" / "teacher_a", ["business", "entertainment", "politics"], "bert", seed=1)
    # id2label LABEL_0, LABEL_1: the example names this teacher's labels itself
    make_tiny_model(tmp_path / "models" / "teacher_b", ["LABEL_0", "LABEL_1"], "roberta", seed=2)
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("pool", [{k: r[k] for k in ("id", "text")} for r in toy_rows(48, 0)]),
                       ("dev", toy_rows(16, 1)), ("test", toy_rows(20, 2))):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / CONFIG.name


def test_own_teachers_example_validates_as_written(own_teachers, capsys):
    assert main(["validate", str(own_teachers)]) == 0
    out = capsys.readouterr().out
    assert "teacher_a" in out and "teacher_b" in out
    assert all(label in out for label in UNION), out


def test_own_teachers_example_runs_on_tiny_models(own_teachers, tmp_path, ray_session):
    student = make_tiny_model(tmp_path / "base", ["x", "y"], "bert", seed=7)
    small = [f"output_dir={tmp_path / 'run'}", f"student.model={student}", "student.epochs=1", "student.max_length=16",
             "student.resources_per_worker={CPU: 0.5}"]
    for i in (0, 1):
        small += [f"teachers[{i}].mc.samples=2", f"teachers[{i}].max_length=16", f"teachers[{i}].resources={{num_cpus: 0.25}}"]
    assert main(["run", str(own_teachers), *sum((["--set", s] for s in small), [])]) == 0
    run = tmp_path / "run"
    config = json.loads((run / "student" / "config.json").read_text())
    assert set(config["id2label"].values()) == UNION
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test_accuracy_per_teacher"]) == {"teacher_a", "teacher_b"}
