"""The shipped RayJob's flow on Ray's own simulated autoscaler: worker nodes start at 0, teachers
wait for them (never refused for nodes the cluster does not have yet), the engine states its
demand, and teachers run side by side once a second node has joined.

`ray.cluster_utils.AutoscalingCluster` drives Ray's fake multi-node provider. Its `start` and
`shutdown` run `ray stop --force`, which ends every Ray on the machine (this pytest's own, a
benchmark's), and its base config (`fake_multi_node/example.yaml`) is not in Ray's wheel; the
subclass below supplies the config and starts and stops only its own head, in its own temp dir.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from ray.cluster_utils import AutoscalingCluster

from tests.test_cluster import free_port, stop_head
from tests.test_student import toy_rows

BIN = Path(sys.executable).parent

FAKE_PROVIDER = {
    "cluster_name": "fake-multinode", "max_workers": 8, "idle_timeout_minutes": 1, "upscaling_speed": 1.0,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {"ssh_user": "ubuntu"}, "docker": {}, "head_node_type": "ray.head.default",
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


class LocalAutoscalingCluster(AutoscalingCluster):
    """AutoscalingCluster whose head runs on free ports in its own temp dir, stopped on its own."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = json.loads(json.dumps(FAKE_PROVIDER))
        config["available_node_types"] = {**worker_node_types, "ray.head.default": {
            "resources": head_resources, "node_config": {}, "max_workers": 0}}
        config.update(config_kwargs)
        return config

    def start(self, env: dict) -> str:
        import ray._private.services as services

        self.temp_dir = Path(tempfile.mkdtemp(prefix="mras-", dir="/tmp"))  # socket paths < 108 bytes
        self.env = {**env, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        port = free_port()
        address = f"{services.get_node_ip_address()}:{port}"
        self._config["provider"]["gcs_address"] = address  # else the fake nodes look for port 6379
        config = self.temp_dir / "autoscaling.json"
        config.write_text(json.dumps(self._config))
        resources = dict(self._head_resources)
        cmd = [BIN / "ray", "start", "--head", f"--port={port}", f"--autoscaling-config={config}",
               f"--num-cpus={resources.pop('CPU')}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               "--object-store-memory=200000000", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180, check=True)
        return address

    def shutdown(self):
        stop_head(self.env, self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.timeout(900)
def test_teachers_wait_for_autoscaled_nodes_then_run_side_by_side(tmp_path, tiny_models):
    """A head with 1 CPU; worker nodes {CPU: 1, teacher_slot: 1}, from 0 to 2; three teachers each ask
    for a teacher_slot, which no node has when the run starts. `muki-ray run` completes, the
    autoscaler added nodes, and two teachers ran side by side on two of them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}:{env['PATH']}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={"slot": {"resources": {"CPU": 1, "teacher_slot": 1}, "node_config": {},
                                    "min_workers": 0, "max_workers": 2}})
    address = cluster.start(env)
    try:
        slot = {"num_cpus": 0.5, "num_gpus": 0, "custom": {"teacher_slot": 1}}
        teacher = {"mc": {"samples": 2}, "max_length": 16, "resources": slot}
        raw = {
            "output_dir": str(tmp_path / "run"),
            "data": {"pool": {"source": jsonl(tmp_path / "pool.jsonl", toy_rows(96, 0))},
                     "dev": {"source": jsonl(tmp_path / "dev.jsonl", toy_rows(8, 1))}},
            "teachers": [
                {"name": "news", "model": str(tiny_models["news"]), "labels": ["business", "politics"], **teacher},
                {"name": "arts", "model": str(tiny_models["misc"]), "labels": ["entertainment", "sport"], **teacher},
                {"name": "lab", "model": str(tiny_models["student"]), "labels": ["science", "health"], **teacher}],
            "integration": {"preset": "paper"},
            "student": {"model": str(tiny_models["student"]), "epochs": 1, "batch_size": 8, "max_length": 16,
                        "resources_per_worker": {"CPU": 0.5}},
            "ray": {"address": address, "autoscaling": True},
        }
        cfg = tmp_path / "job.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        run = subprocess.run([BIN / "muki-ray", "run", str(cfg)], env=env, capture_output=True, text=True,
                             timeout=800)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        preds = json.loads((tmp_path / "run" / "predictions" / "manifest.json").read_text())
        timeline, nodes = preds["schedule"], preds["nodes"]
        assert set(timeline) == {"news", "arts", "lab"}, timeline
        # Every teacher ran on an added worker node (only they have a teacher_slot), two of them at once.
        on = {name: set(by_node) for name, by_node in nodes.items()}
        assert all(len(v) == 1 for v in on.values()) and len(set.union(*on.values())) == 2, on
        def overlap(a, b):
            return max(timeline[a]["start"], timeline[b]["start"]) < min(timeline[a]["end"], timeline[b]["end"])

        side_by_side = [(a, b) for a in timeline for b in timeline if a < b and overlap(a, b) and on[a] != on[b]]
        assert side_by_side, timeline
        assert re.search(r"predict: waiting for \d teacher_slot \(teachers? \w+", run.stderr), run.stderr[-3000:]
        assert (tmp_path / "run" / "student" / "config.json").exists()
    finally:
        cluster.shutdown()
