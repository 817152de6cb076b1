"""Bad input: `muki-ray run` exits 2 with one line naming the field, file or row, no traceback, and
leaves nothing in the run directory. Every case is checked before Ray starts or anything is written
(except the two environment cases, which need a Ray to ask)."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import yaml

from muki_ray.run.cli import main
from muki_ray.config.schema import parse_config
from muki_ray.config.preflight import check_resources
from tests.conftest import make_tiny_model

ROWS = [{"id": f"d{i}", "text": f"market stock {i}", "label": "business"} for i in range(6)]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def base(tmp_path, tiny_models):
    data = tmp_path / "data"
    data.mkdir()
    return {
        "output_dir": str(tmp_path / "run"),
        "data": {"pool": {"source": jsonl(data / "pool.jsonl", ROWS)},
                 "dev": {"source": jsonl(data / "dev.jsonl", ROWS)},
                 "test": {"source": jsonl(data / "test.jsonl", ROWS)}},
        "teachers": [{"name": "news", "model": str(tiny_models["news"]), "mc": {"samples": 2}},
                     {"name": "arts", "model": str(tiny_models["arts"]), "mc": {"samples": 2}}],
        "student": {"model": str(tiny_models["student"]), "epochs": 1},
        "ray": {"num_cpus": 2},
    }


def model_copy(tmp_path, tiny_models, name="news"):
    dst = tmp_path / f"broken-{name}"
    shutil.copytree(tiny_models[name], dst)
    return dst


# --- each case edits the config (and may write files); returns extra CLI args, or None ---------------
def drop(*path):
    def edit(raw, tmp_path, tiny_models):
        node = raw
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return edit


def put(value, *path):
    def edit(raw, tmp_path, tiny_models):
        node = raw
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


def generic_labels(raw, tmp_path, tiny_models):
    raw["teachers"][0]["model"] = str(make_tiny_model(tmp_path / "generic", ["LABEL_0", "LABEL_1"]))


def no_dropout(raw, tmp_path, tiny_models):
    raw["teachers"][0]["model"] = str(make_tiny_model(tmp_path / "nodrop", ["business", "politics"],
                                                      hidden_dropout=0.0))


def no_config_json(raw, tmp_path, tiny_models):
    (tmp_path / "empty").mkdir()
    raw["teachers"][0]["model"] = str(tmp_path / "empty")


def bad_tokenizer(raw, tmp_path, tiny_models):
    folder = model_copy(tmp_path, tiny_models)
    for f in folder.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    (folder / "tokenizer.json").write_text("{not json")
    raw["teachers"][0]["model"] = str(folder)


def bad_encoder_tokenizer(raw, tmp_path, tiny_models):
    bad_tokenizer(raw, tmp_path, tiny_models)
    raw["integration"] = {"prototypes": {"model": raw["teachers"][0].pop("model")}}
    raw["teachers"][0]["model"] = str(tiny_models["news"])


def bad_weights(raw, tmp_path, tiny_models):
    folder = model_copy(tmp_path, tiny_models)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    raw["teachers"][0]["model"] = str(folder)


def pickle_weights(raw, tmp_path, tiny_models):
    folder = model_copy(tmp_path, tiny_models)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    raw["teachers"][0]["model"] = str(folder)


def pool_file(content: bytes):
    def edit(raw, tmp_path, tiny_models):
        p = tmp_path / "data" / "bad_pool.jsonl"
        p.write_bytes(content)
        raw["data"]["pool"]["source"] = str(p)
    return edit


def dev_rows(rows):
    def edit(raw, tmp_path, tiny_models):
        raw["data"]["dev"]["source"] = jsonl(tmp_path / "data" / "bad_dev.jsonl", rows)
    return edit


def bad_override(raw, tmp_path, tiny_models):
    return ["--set", "integration.nope=1"]


def dead_address(raw, tmp_path, tiny_models):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw["ray"] = {"address": f"127.0.0.1:{port}"}


LINE = b'{"id": "a", "text": "market"}\n'
CASES = [
    # config: missing fields, wrong types, unknown keys
    ("missing-student", drop("student"), "student: required field is missing"),
    ("missing-teacher-name", drop("teachers", 0, "name"), "teachers[0].name: required field is missing"),
    ("wrong-type", put("big", "teachers", 0, "batch_size"), "teachers[0].batch_size:"),
    ("wrong-type-nested", put("many", "student", "epochs"), "student.epochs:"),
    ("unknown-key", put(1, "bogus"), "bogus: unknown key"),
    ("bad-teacher-name", put("bad name", "teachers", 0, "name"), "teachers[0].name:"),
    ("unknown-strategy", put({"strategy": "magic"}, "integration"), "integration.strategy:"),
    ("no-teachers", put([], "teachers"), "teachers:"),
    ("bad-part", put([0.5, 0.2], "data", "pool", "part"), "data.pool.part: must satisfy"),
    ("bad-on-bad-row", put("ignore", "data", "on_bad_row"), "data.on_bad_row:"),
    ("zero-cpus", put({"num_cpus": 0}, "ray"), "ray.num_cpus:"),
    ("unknown-nested-key", put("red", "teachers", 1, "color"), "teachers[1].color: unknown key"),
    # config: teachers and their labels
    ("duplicate-teacher", put("news", "teachers", 1, "name"), "teachers[1].name: duplicate teacher name"),
    ("single-label-teacher", put(["business"], "teachers", 0, "labels"), "teachers[0].labels: a teacher needs at "
     "least 2 labels"),
    ("labels-shorter-than-head", put(["x", "y"], "teachers", 1, "labels"), "teachers[1].labels: 2 labels given "
     "but the model head has 3"),
    ("labels-longer-than-head", put(list("abcd"), "teachers", 1, "labels"), "teachers[1].labels: 4 labels given"),
    ("generic-label-names", generic_labels, "teachers[0].labels: the model's id2label has generic LABEL_k names"),
    # config: method settings
    ("tau-zero", put({"temperature": 0}, "integration"), "integration.temperature: must be > 0"),
    ("tau-negative", put({"temperature": -1}, "integration"), "integration.temperature: must be > 0"),
    ("dropout-negative", put({"dropout": -0.1}, "teachers", 0, "mc"), "teachers[0].mc.dropout:"),
    ("k-zero", put({"samples": 0}, "teachers", 0, "mc"), "teachers[0].mc.samples:"),
    ("dropout-one", put({"dropout": 1.0}, "teachers", 0, "mc"), "teachers[0].mc.dropout: must be in [0, 1)"),
    ("zero-stage-5", put(5, "student", "zero_stage"), "student.zero_stage: must be 0, 1, 2 or 3"),
    ("oracle-without-gold", put({"strategy": "oracle"}, "integration"), "integration.strategy: 'oracle' needs "
     "gold labels"),
    ("supervised-without-gold", put({"strategy": "supervised"}, "integration"), "integration.strategy: "
     "'supervised' needs gold labels"),
    ("bad-override", bad_override, "integration.nope: unknown key"),
    # models
    ("missing-model-folder", put("/nonexistent/model", "teachers", 0, "model"), "teachers[0].model: model folder "
     "/nonexistent/model does not exist"),
    ("missing-student-folder", put("/nonexistent/student", "student", "model"), "student.model:"),
    ("no-config-json", no_config_json, "no config.json"),
    ("no-dropout-to-sample", no_dropout, "teachers[0].mc: teacher 'news': no dropout with p > 0 runs in its "
                                         "forward, so its K MC-Dropout passes would be identical; set its mc.dropout"),
    ("tokenizer-does-not-load", bad_tokenizer, "teachers[0].model:"),
    ("encoder-tokenizer-does-not-load", bad_encoder_tokenizer, "integration.prototypes.model:"),
    ("weights-do-not-load", bad_weights, "weights failed to load"),
    ("pickle-without-opt-in", pickle_weights, "holds only pickle weights; convert to safetensors or set "
     "allow_pickle: true"),
    # data
    ("missing-data-file", put({"source": "/nonexistent/pool.jsonl"}, "data", "pool"), "data.pool.source: "
     "/nonexistent/pool.jsonl does not exist"),
    ("empty-data-file", pool_file(b""), "bad_pool.jsonl: no rows"),
    ("missing-text-column", pool_file(b'{"id": "a", "body": "x"}\n'), "missing text column 'text'"),
    ("empty-text", pool_file(LINE + b'{"id": "b", "text": ""}\n'), "bad_pool.jsonl: line 2: empty text"),
    ("non-utf8", pool_file(LINE + b'{"id": "b", "text": "caf\xe9"}\n'), "bad_pool.jsonl: line 2: text is not valid UTF-8"),
    ("duplicate-ids", pool_file(LINE + LINE), "duplicate id 'a'"),
    ("not-json-line", pool_file(LINE + b"{oops\n"), "bad_pool.jsonl: line 2: not valid JSON"),
    ("gold-label-outside-union", dev_rows(ROWS + [{"id": "w", "text": "rain", "label": "weather"}]),
     "data.dev: label 'weather' is not in the union label space"),
    ("no-label-column-in-dev", dev_rows([{"id": "a", "text": "x"}]), "no label column 'label'"),
    # output directory
    ("output-dir-unwritable", put("/proc/muki-run", "output_dir"), "output_dir: cannot write to /proc"),
    # environment
    ("ray-address-nothing-there", dead_address, "ray.address: no Ray cluster at 127.0.0.1:"),
]


@pytest.mark.parametrize("edit,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, base, tiny_models, capsys, edit, expected):
    extra = edit(base, tmp_path, tiny_models) or []
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base))
    code = main(["run", str(cfg), *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    run_dir = tmp_path / "run"
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.mark.parametrize("content,expected", [("a: [1, 2", "invalid YAML"),
                                              ("- just\n- a list\n", "must be a YAML mapping")])
def test_bad_yaml_file(tmp_path, capsys, content, expected):
    p = tmp_path / "bad.yaml"
    p.write_text(content)
    code = main(["run", str(p)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and str(p) in err and "Traceback" not in err


def test_an_actor_no_node_can_hold_is_refused_before_any_work(tmp_path, base, capsys, ray_session):
    """Ray places an actor on one node: a teacher asking for a custom resource no node has more
    than 1 of, or a training worker larger than the largest node, would wait forever."""
    base["teachers"][1]["resources"] = {"custom": {"teacher_slot": 2}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error: teachers[1].resources.custom: one actor asks for 2 teacher_slot, but no node has that much " \
           "(the largest node has 0 teacher_slot)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    base["teachers"][1]["resources"] = {}
    base["student"]["resources_per_worker"] = {"CPU": 64}
    cfg.write_text(yaml.safe_dump(base))
    assert main(["run", str(cfg)]) == 2
    assert "error: student.resources_per_worker: one actor asks for 64 CPU, but no node has that much " \
           "(the largest node has 2 CPU)" in capsys.readouterr().err


def test_gpus_asked_on_a_cluster_without_any(tmp_path, base, capsys, ray_session):
    base["teachers"][0]["resources"] = {"num_gpus": 1}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base))
    code = main(["run", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: teachers[0].resources.num_gpus: asks for 1 GPU(s) but the Ray cluster has none" in err
    assert not (tmp_path / "run").exists()
    base["ray"]["autoscaling"] = True  # GPU nodes may join later: the check steps aside
    base["teachers"][1]["resources"] = {"num_gpus": 0}  # on an autoscaling cluster every teacher says

    check_resources(parse_config(base), {"CPU": 2.0})
