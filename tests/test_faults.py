"""Faults: a dying teacher actor, a dying training worker, a SIGKILLed run, a full or unwritable disk,
and secrets that must never reach the run directory."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import yaml

from muki_ray.run.cli import main
from muki_ray.core.manifest import read_manifest, write_json_atomic
from muki_ray.run.pipeline import predict_stage, train_stage
from tests.test_run import run_config  # noqa: F401  (fixture)
from tests.test_student import SPACE, prepare, train_log
from tests.test_teachers import _cfg


def test_teacher_actor_dies_mid_stream(tmp_path, tiny_models, ray_session, monkeypatch):
    cfg, space = _cfg(tmp_path, tiny_models, n=96, replicas=1, batch_size=8)
    marker = tmp_path / "news-died"
    monkeypatch.setenv("MUKI_FAULT_TEACHER", f"news:3:{marker}")  # exit after the 3rd batch, once
    info = predict_stage(cfg, space, tmp_path / "run")
    assert marker.exists()  # the actor really died
    ids = pq.read_table(tmp_path / "run" / "predictions" / "data").column("id").to_pylist()
    assert sorted(ids) == sorted(f"doc{i}" for i in range(96)) and len(ids) == len(set(ids)) == info["rows"]


def test_a_worker_killed_mid_epoch_resumes_at_its_last_step_checkpoint(tmp_path, ray_session, monkeypatch):
    cfg, run = prepare(tmp_path, strategy="vanilla_kd", zero=0, workers=1, epochs=1, max_failures=1,
                       checkpoint_every_steps=2)  # (vanilla_kd's loss through the trainer)
    # Several blocks: the order across blocks is what a resumed epoch relies on.
    data = run / "targets" / "data"
    table = pq.read_table(data / "part-0.parquet")
    (data / "part-0.parquet").unlink()
    for k in range(4):
        pq.write_table(table.slice(16 * k, 16), data / f"part-{k}.parquet")
    marker, trace = tmp_path / "worker-died", tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv("MUKI_FAULT_TRAIN_STEP", f"5:{marker}")  # killed after step 5 of 8
    monkeypatch.setenv("MUKI_TRACE_TRAIN_ROWS", str(trace))
    train_stage(cfg, SPACE, run)  # FailureConfig restarts the worker group from the step-4 checkpoint
    assert marker.exists()
    log = train_log(run)
    assert [(r["epoch"], r["step"], r["global_step"]) for r in log if r.get("event") == "resumed"] == [(0, 4, 4)]
    steps = [json.loads(line) for line in (trace / "rank0.jsonl").read_text().splitlines()]
    first, second = ([s for s in steps if s["pid"] == pid] for pid in dict.fromkeys(s["pid"] for s in steps))
    assert [s["step"] for s in first] == [0, 1, 2, 3, 4] and [s["step"] for s in second] == [4, 5, 6, 7]
    assert second[0]["ids"] == first[4]["ids"]  # the same rows, in the same order, on the new attempt
    trained = [i for s in first[:4] + second for i in s["ids"]]
    assert sorted(trained) == sorted(f"0-{i}" for i in range(64))  # every row of the epoch exactly once
    assert [r["global_step"] for r in log if r.get("event") == "epoch"] == [8]
    assert all(r["loss"] > 0 and r["loss"] < float("inf") for r in log if "loss" in r)
    assert (run / "student" / "config.json").exists()


def _cli(*args, env=None, **kw):
    """The CLI in its own session; its output is drained by a thread into proc.lines (a run that
    fills an unread pipe would block on its next write)."""
    proc = subprocess.Popen([sys.executable, "-m", "muki_ray.run.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    proc.lines = []
    proc.reader = threading.Thread(target=lambda: proc.lines.extend(proc.stdout), daemon=True)
    proc.reader.start()
    return proc


def _output(proc, timeout=None) -> str:
    proc.wait(timeout=timeout)
    proc.reader.join(timeout=30)
    return "".join(proc.lines)


def test_sigkill_mid_stage_then_rerun_resumes_and_leaks_no_secret(run_config, tmp_path, tiny_models):  # noqa: F811
    cfg, run = run_config
    raw = yaml.safe_load(cfg.read_text())
    raw.pop("prepare")  # teachers with their own folders: the stages after prepare are what is killed
    raw["data"].pop("test")  # (no evaluation pass: the train stage is the one killed)
    for t, m in zip(raw["teachers"], ("news", "arts")):
        t["model"] = str(tiny_models[m])
    cfg.write_text(yaml.safe_dump({**raw, "integration": {"preset": "paper"}}))  # selection is not the point here
    secrets = {"RAY_AUTH_TOKEN": "tok-3f9a7c1d-secret", "AWS_SECRET_ACCESS_KEY": "aws-8b2e4f6a-secret",
               "HF_TOKEN": "hf_5d1c9e7b-secret"}
    env = {**os.environ, **secrets}
    env.pop("RAY_ADDRESS", None)
    first = _cli("run", str(cfg), env=env)
    deadline = time.time() + 480
    while read_manifest(run / "targets") is None or not (run / "train").exists():
        assert first.poll() is None, "".join(first.lines)
        assert time.time() < deadline, "the run never reached the train stage"
        time.sleep(0.5)
    time.sleep(3)  # well inside the train stage
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert read_manifest(run / "train") is None  # interrupted: no manifest, so never read as complete
    (run / "train" / "partial-junk.bin").write_bytes(b"half a file")

    second = _cli("run", str(cfg), env=env)
    out = _output(second, timeout=600)
    assert second.returncode == 0, out
    for stage in ("predictions", "targets"):
        assert any(line.split()[1:5] == [stage, "up", "to", "date"] for line in out.splitlines()), out
    assert any(line.split()[1:4] == ["train", "done", "in"] for line in out.splitlines()), out
    assert not (run / "train" / "partial-junk.bin").exists()  # the stage was rebuilt, not patched
    assert "dev_accuracy" in json.loads((run / "metrics.json").read_text())
    # No secret from the environment reaches any file of the run directory.
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in secrets.values():
                assert value.encode() not in data, f"{path} holds a secret"


def test_full_disk_is_refused_before_any_work(run_config, monkeypatch, capsys):  # noqa: F811
    cfg, run = run_config
    real = shutil.disk_usage
    monkeypatch.setattr("muki_ray.config.preflight.shutil.disk_usage",
                        lambda p: real(p)._replace(free=50 * 1024**2))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error: output_dir: only 50 MiB free on" in err and "Traceback" not in err
    assert not run.exists()


def test_write_error_mid_run_names_the_path(run_config, ray_session, monkeypatch, capsys):  # noqa: F811
    cfg, run = run_config
    target = run / "prepare" / "blocked" / "manifest.json"

    def stage_that_hits_a_write_error(cfg_, space, run_dir):
        (run / "prepare").mkdir(parents=True)
        (run / "prepare" / "blocked").write_text("a file where a folder should be")
        write_json_atomic(target, {"rows": 1})  # a real write that fails like a full or broken disk

    monkeypatch.setitem(importlib.import_module("muki_ray.run.pipeline").STAGE_FUNCTIONS, "prepare",
                        stage_that_hits_a_write_error)
    assert main(["run", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"error: {target}: Not a directory" in err
    assert "Traceback" not in err
