"""Cluster configs and a real `ray job submit` against a local Ray head with token auth."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import psutil
import pytest
import ray
import yaml

from muki_ray.config.schema import ConfigError, parse_config
from muki_ray.run.jobs import job_output_dir, storage_problem
from muki_ray.config.preflight import load_checked
from tests.test_run import NOISE
from tests.test_student import toy_rows

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_cluster_launcher_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311-gpu")
    gpus = cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"]
    assert gpus >= 1 and "GPU" not in cfg["available_node_types"]["head"]["resources"]
    assert any("pip install" in c and "muki-ray" in c for c in cfg["setup_commands"])
    # Shared storage is really mounted on every host, where the container bind-mounts it.
    (mount,) = cfg["initialization_commands"]
    assert "mount -t nfs4" in mount and "/mnt/cluster_storage" in mount and "REPLACE-ME" in mount
    assert "-v /mnt/cluster_storage:/mnt/cluster_storage" in cfg["docker"]["run_options"]


def test_rayjob_entrypoint_and_resources_are_consistent():
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "RayJob" and spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    yaml.safe_load(spec["runtimeEnvYAML"])
    argv = shlex.split(spec["entrypoint"])
    script, config = argv[1], argv[argv.index("--config") + 1]
    assert (REPO / script).is_file() and (REPO / config).is_file()
    cfg = load_checked(REPO / config)
    (worker,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    pod = worker["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    cluster_gpus = gpus_per_pod * worker["maxReplicas"]
    teacher_gpus = [t.resources.num_gpus * t.resources.replicas for t in cfg.teachers]
    assert all(t.resources.num_gpus <= gpus_per_pod for t in cfg.teachers)  # one actor fits one pod
    assert sum(teacher_gpus) <= cluster_gpus
    student_gpus = cfg.student.num_workers * cfg.student.resources_per_worker.get("GPU", 1)
    assert cfg.student.use_gpu and student_gpus <= cluster_gpus
    # The run directory is on the volume every pod mounts.
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert any(cfg.output_dir.startswith(m) for m in mounts)
    assert storage_problem(cfg.output_dir, alive_nodes=3) is None
    # Autoscaling from zero GPU pods, with teachers that wait for GPUs (never a silent CPU default).
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert worker["minReplicas"] == 0 and worker["maxReplicas"] >= 2 and cfg.ray.autoscaling
    assert all(t.resources.num_gpus == 1 for t in cfg.teachers)
    # Every pod mounts the one ReadWriteMany claim that storage.yaml defines, and a memory /dev/shm.
    (pvc,) = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / "storage.yaml").read_text()))
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for group in [cluster["headGroupSpec"], worker]:
        pod_spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        assert volumes["cluster-storage"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert {m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]} >= {"/mnt/cluster_storage",
                                                                                      "/dev/shm"}
    assert {"runs", ".venv"} <= set(yaml.safe_load(spec["runtimeEnvYAML"])["excludes"])


def test_a_jobs_relative_output_dir_is_resolved_on_shared_storage_or_refused(tmp_path):
    path, line = job_output_dir("runs/x", ("/nope", str(tmp_path)))
    assert path == str(tmp_path / "runs/x") and line.endswith(f"resolved against the shared storage root: {path}")
    path, line = job_output_dir("runs/x", ("/nope",))
    assert path is None and line.startswith("output_dir: runs/x is relative") and "temporary working-dir" in line
    raw = yaml.safe_load((REPO / "jobs" / "configs" / "cluster.yaml").read_text())
    del raw["teachers"][0]["resources"]["num_gpus"]
    with pytest.raises(ConfigError, match=r"teachers\[0\].resources.num_gpus: required with ray.autoscaling"):
        parse_config(raw)


def test_local_paths_refused_on_multinode(tmp_path):
    assert storage_problem(str(tmp_path / "run"), alive_nodes=1) is None
    msg = storage_problem(str(tmp_path / "run"), alive_nodes=4)
    assert msg.startswith("output_dir:") and "node-local path on a 4-node cluster" in msg
    assert storage_problem("/mnt/cluster_storage/x", alive_nodes=4) is None
    assert "object-store URI" in storage_problem("s3://bucket/run", alive_nodes=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_job_config(tmp_path, tiny_models) -> Path:
    def jsonl(name, rows):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    raw = {
        "output_dir": str(tmp_path / "run"),
        "data": {"pool": {"source": jsonl("pool.jsonl", toy_rows(32, 0))},
                 "dev": {"source": jsonl("dev.jsonl", toy_rows(8, 1))}},  # no test split: no evaluation pass
        "teachers": [{"name": "news", "model": str(tiny_models["news"]), "labels": ["business", "politics"],
                      "mc": {"samples": 2}, "max_length": 16, "resources": {"num_cpus": 0.25}},
                     {"name": "arts", "model": str(tiny_models["misc"]), "labels": ["entertainment", "sport"],
                      "mc": {"samples": 2}, "max_length": 16, "resources": {"num_cpus": 0.25}}],
        "integration": {"preset": "paper"},  # the selection recipes are tested in test_prototypes
        "student": {"model": str(tiny_models["student"]), "epochs": 1, "batch_size": 8, "max_length": 16,
                    "resources_per_worker": {"CPU": 0.5}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_real_job_submission_with_token_auth(tmp_path, tiny_models):
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed in this environment")
    home = tmp_path / "home"
    home.mkdir()

    temp_dir = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))  # Unix socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}:{env['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    token = subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert token
    port, dash = free_port(), free_port()
    start = subprocess.run(
        [BIN / "ray", "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # Every port free, not Ray's defaults: another Ray on this machine (a benchmark, a demo)
         # already holds 52365 and friends, and its agent would then fail to start.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--num-cpus=2", "--object-store-memory=200000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    if start.returncode != 0 and "Permission" in start.stderr:
        pytest.skip(f"ray start cannot run here: {start.stderr.strip().splitlines()[-1]}")
    try:
        assert start.returncode == 0, start.stderr
        address = f"http://127.0.0.1:{dash}"
        cfg = tiny_job_config(tmp_path, tiny_models)
        for _ in range(10):  # the head's job agent comes up a little after `ray start` returns
            submit = subprocess.run(
                [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
                 "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--",
                 "python", "jobs/integrate.py", "--config", str(cfg)],
                env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout.lower()  # "Job ... succeeded"
        # `ray job logs` (streamed by submit) reads like the CLI: stage lines, no noise.
        logs = submit.stdout.split("Tailing logs until the job exits")[-1].splitlines()
        assert len(logs) <= 60 and any("train        done in" in line for line in logs), submit.stdout
        assert not [n for n in NOISE if n in submit.stdout], submit.stdout
        run = tmp_path / "run"
        assert (run / "student" / "config.json").exists() and "dev_accuracy" in json.loads(
            (run / "metrics.json").read_text())
        # The token never lands in the run directory.
        for p in run.rglob("*"):
            if p.is_file() and p.stat().st_size < 50_000_000:
                assert token.encode() not in p.read_bytes(), p
        # A client without the token is refused.
        other = tmp_path / "other-home"
        other.mkdir()
        anon = {**env, "HOME": str(other)}
        anon.pop("RAY_AUTH_TOKEN", None)
        refused = subprocess.run([BIN / "ray", "job", "list", "--address", address], env=anon,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "token" in (refused.stdout + refused.stderr).lower() or "401" in refused.stdout + refused.stderr
    finally:
        stop_head(env, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(env: dict, temp_dir: Path) -> None:
    """End only the processes of the head this test started (their command lines name its temp
    dir): `ray stop` would end every Ray on the machine, this pytest's own and any benchmark's."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    time.sleep(1)
