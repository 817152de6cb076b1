"""Scale-out: teachers scheduled within the cluster, failure isolation, growing pools, several
nodes, `diff` agreeing with `run`, and a driver whose memory does not grow with the pool."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import transformers
import yaml

from muki_ray.run import pipeline
from muki_ray.stages.cache import TeacherCache, config_key, plan_changes, stage_keys
from muki_ray.run.cli import main
from muki_ray.core.cluster import ClusterError, node_resources, refuse_oversized
from muki_ray.config.schema import parse_config
from muki_ray.config.labels import LabelSpace
from muki_ray.core.manifest import begin_stage, finish_stage, read_manifest
from muki_ray.data.pool import bucket_of
from muki_ray.run.pipeline import predict_stage
from muki_ray.stages.schedule import Job, Stalled, TeacherFailed, actors_that_fit, run_within, settled_free
from tests.conftest import WORDS
from tests.test_student import toy_rows, train_log

REPO = Path(__file__).resolve().parents[1]


def write_pool(path: Path, n: int, start: int = 0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "a") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(WORDS, size=rng.integers(2, 12)))}) + "\n")
    return path


def teachers_cfg(tmp_path, tiny_models, names, pool, **resources):
    raw = {"output_dir": str(tmp_path / "run"), "data": {"pool": {"source": str(pool)}, "buckets": 8},
           "teachers": [{"name": n, "model": str(tiny_models["news"]), "batch_size": 256, "max_length": 16,
                         "mc": {"samples": 2}, "resources": {"num_cpus": 0.5, **resources}} for n in names],
           "student": {"model": str(tiny_models["student"])}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    return cfg, LabelSpace.from_teachers({n: ["business", "politics"] for n in names})


def cache_ids(cfg, space, i) -> list[str]:
    """Every id in teacher i's cache (a test's view of the files; the engine never reads them whole)."""
    return [rid for part in TeacherCache.of(cfg, space, i).parts()
            for f in Path(part).rglob("*.parquet") for rid in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


# ------------------------------------------------------------------ the scheduler alone
def test_the_scheduler_stays_within_the_budget_and_keeps_going_after_a_failure():
    running, peak, lock = [0], [0], threading.Lock()

    def work(name, fail=False):
        def run(actors):
            with lock:
                running[0] += actors
                peak[0] = max(peak[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= actors
            if fail:
                raise RuntimeError("boom on batch 3")
            return {"name": name, "actors": actors}
        return run

    jobs = [Job(f"t{i}", {"CPU": 1.0}, 1, work(f"t{i}", fail=i == 2)) for i in range(6)]
    with pytest.raises(TeacherFailed, match=r"teacher 't2' failed: boom on batch 3") as e:
        run_within(jobs, {"CPU": 2.0})
    assert list(e.value.failures) == ["t2"] and peak[0] <= 2  # never more than the free CPUs
    results, timeline = run_within([Job("big", {"CPU": 1.0}, 4, work("big")), Job("b", {"CPU": 1.0}, 1, work("b"))],
                                   {"CPU": 3.0})
    assert timeline["big"]["actors"] == 3 and timeline["b"]["start"] >= timeline["big"]["end"] - 1e-3
    assert actors_that_fit(Job("g", {"CPU": 1.0, "GPU": 1.0}, 8, work("g")), {"CPU": 16.0, "GPU": 2.0}) == 2


def test_nodes_that_join_mid_stage_are_used_and_the_demand_is_stated_then_withdrawn(caplog):
    """A cluster with one teacher_slot when the stage starts: the first teacher runs, the others
    wait. A node with a second slot joins while the first still runs, and a waiting teacher starts on
    it at once. Meanwhile the scheduler states one bundle per actor, running and waiting, restates
    it as it changes, says what it waits for, and withdraws the demand when the stage ends."""
    slots, first_running, joined = [1.0], threading.Event(), threading.Event()
    ended, stated = set(), []

    def work(name):
        def run(actors):
            running_first = "t0" not in ended
            if name == "t0":
                first_running.set()
                assert joined.wait(10)
                time.sleep(0.3)  # still running when the next teacher starts
            ended.add(name)
            return {"running_first": running_first}
        return run

    def total():
        if first_running.is_set() and not joined.is_set():
            slots[0] = 2.0  # a node joins while t0 runs
            joined.set()
        return {"CPU": 4.0, "teacher_slot": slots[0]}

    jobs = [Job(f"t{i}", {"CPU": 0.5, "teacher_slot": 1.0}, 1, work(f"t{i}")) for i in range(3)]
    with caplog.at_level(logging.INFO, logger="muki_ray.stages.schedule"):
        results, timeline = run_within(jobs, {"CPU": 4.0, "teacher_slot": 1.0}, total=total,
                                       demand=stated.append, poll_s=0.05)
    assert results["t1"]["running_first"], timeline  # started on the new node while t0 still ran
    assert timeline["t1"]["start"] < timeline["t0"]["end"]
    one = {"CPU": 0.5, "teacher_slot": 1.0}
    assert stated[0] == [one] * 3 and stated[-1] == []  # every actor, running and waiting; then withdrawn
    assert "predict: waiting for 2 teacher_slot (teachers t1, t2)" in caplog.text


def test_a_job_whose_progress_stops_or_cannot_be_read_is_given_up_and_the_others_finish():
    """A job's progress that holds still, or that cannot be read at all (its counter lost), for its
    stall_s ends that job with Stalled; a job whose progress keeps moving runs to its end."""
    release, ticks = threading.Event(), [0]

    def blocked(actors):  # a pipeline waiting for actors that never come
        release.wait(30)
        return {}

    def steady(actors):
        for _ in range(12):
            ticks[0] += 1
            time.sleep(0.05)
        return {"done": True}

    jobs = [Job("stuck", {"CPU": 1.0}, 1, blocked, progress=lambda: 5, stall_s=0.3, stall_hint=" (hint)"),
            Job("unread", {"CPU": 1.0}, 1, blocked, progress=lambda: None, stall_s=0.3),
            Job("moving", {"CPU": 1.0}, 1, steady, progress=lambda: ticks[0], stall_s=0.3)]
    try:
        with pytest.raises(TeacherFailed) as e:
            run_within(jobs, {"CPU": 3.0}, poll_s=0.05)
    finally:
        release.set()
    assert sorted(e.value.failures) == ["stuck", "unread"]
    assert str(e.value.failures["stuck"]) == "no row computed for 0.3 s (hint)"
    assert all(isinstance(f, Stalled) for f in e.value.failures.values())


def test_a_request_no_single_node_can_hold_is_refused_naming_the_field_and_the_largest_node():
    """Ray places an actor on one node: two nodes with 1 teacher_slot each hold 2 in all, but an
    actor asking for 2 would wait forever. Refused up front, naming the field, the resource and
    the largest node; a request that fits one node passes, and so does one split over nodes only
    when each actor fits one of them."""
    nodes = node_resources([{"Alive": True, "Resources": {"CPU": 4.0, "teacher_slot": 1.0}},
                            {"Alive": True, "Resources": {"CPU": 8.0, "teacher_slot": 1.0}},
                            {"Alive": False, "Resources": {"CPU": 64.0, "teacher_slot": 4.0}}])  # a lost node
    assert nodes == [{"CPU": 4.0, "teacher_slot": 1.0}, {"CPU": 8.0, "teacher_slot": 1.0}]
    with pytest.raises(ClusterError, match=r"^teachers\[0\].resources.custom: one actor asks for 2 teacher_slot, but "
                                           r"no node has that much \(the largest node has 1 teacher_slot\)$"):
        refuse_oversized({"teachers[0].resources.{res}": {"CPU": 1.0, "teacher_slot": 2.0}}, nodes)
    with pytest.raises(ClusterError, match=r"^student.resources_per_worker: one actor asks for 1 GPU, but no node "
                                           r"has that much \(the largest node has 0 GPU\)$"):
        refuse_oversized({"student.resources_per_worker": {"CPU": 1.0, "GPU": 1.0}}, nodes)
    # 6 CPUs and a slot: only the 8-CPU node holds both, so it fits; 6 CPUs on the 4-CPU node's terms would not.
    refuse_oversized({"teachers[1].resources": {"CPU": 6.0, "teacher_slot": 1.0, "GPU": 0.0}}, nodes)
    mixed = [{"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0}]  # CPUs on one node, the GPU on another
    with pytest.raises(ClusterError, match=r"one actor asks for 4 CPU, 1 GPU, but no node has all of it at once"):
        refuse_oversized({"student.resources_per_worker": {"CPU": 4.0, "GPU": 1.0}}, mixed)


def test_free_resources_are_read_once_finished_work_has_handed_them_back():
    """Ray's free view lags behind work that just ended: wait until every CPU is back, or until
    the view holds still (another job keeps some), so no teacher slot is lost to a stale read."""
    total = {"CPU": 2.0, "memory": 1e9}
    views = iter([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0, "memory": 5e8}])
    assert settled_free(lambda: next(views), total, interval_s=0.0)["CPU"] == 2.0
    busy = settled_free(lambda: {"CPU": 0.5}, total, interval_s=0.01, stable_s=0.05)  # held by another job
    assert busy == {"CPU": 0.5}


# ------------------------------------------------------------------ the real stage
def test_eight_teachers_on_two_cpus_complete_with_every_id_once(tmp_path, tiny_models, ray_session):
    """More teachers than slots (8 x 1 CPU on 2 CPUs) over a pool of many blocks: the chained
    design hung here; independent pipelines within the free resources cannot (schedule.py)."""
    pool = write_pool(tmp_path / "pool.jsonl", 1500)
    names = [f"t{i}" for i in range(8)]
    cfg, space = teachers_cfg(tmp_path, tiny_models, names, pool)
    for t in cfg.teachers:
        t.resources.num_cpus = 1.0
    info = predict_stage(cfg, space, tmp_path / "run")
    assert sum(1 for n in read_manifest(tmp_path / "run" / "pool")["bucket_rows"] if n) == 8  # 8 blocks at least
    expected = sorted(f"doc{i}" for i in range(1500))
    for i in range(8):
        assert sorted(cache_ids(cfg, space, i)) == expected  # every id exactly once in every cache
    sched = info["schedule"]
    overlap = max(sum(1 for s in sched.values() if s["start"] <= t < s["end"]) for t in
                  [s["start"] + 1e-3 for s in sched.values()])
    assert overlap == 2 and info["rows"] == 1500  # never more pools than CPUs, and every CPU used


def test_a_failing_teacher_keeps_the_others_caches_and_a_rerun_computes_only_it(
        tmp_path, tiny_models, ray_session, monkeypatch, capsys):
    pool = write_pool(tmp_path / "pool.jsonl", 800)
    cfg, space = teachers_cfg(tmp_path, tiny_models, ["a", "b", "c"], pool)
    for t in cfg.teachers:
        t.batch_size = 32
    monkeypatch.setenv("MUKI_FAULT_TEACHER", "b:3:raise")  # raise on b's 3rd batch
    # Through the CLI: one line names the teacher and where the traceback is; none on the console.
    capsys.readouterr()
    assert main(["predict-teachers", str(tmp_path / "cfg.yaml")]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "teacher 'b' failed" in errors[0], err
    assert "Traceback" not in err
    assert "Traceback" in Path(errors[0].split("full traceback in ")[1].rstrip(")")).read_text()
    assert "(and " not in errors[0]  # b alone failed
    expected = sorted(f"doc{i}" for i in range(800))
    assert sorted(cache_ids(cfg, space, 0)) == expected and sorted(cache_ids(cfg, space, 2)) == expected
    assert cache_ids(cfg, space, 1) == []  # the failed teacher left no part a rerun would read
    # Its actors exited: every CPU is free again (a leaked actor would hold its share for good).
    # Under a loaded CI machine an exiting actor can take seconds to hand its share back, so this waits
    # up to a minute for the CPUs to come back; a leaked actor never hands them back and still fails.
    total = ray_session.cluster_resources()
    free = settled_free(ray_session.available_resources, total, timeout_s=60.0, stable_s=60.0)
    assert free["CPU"] == total["CPU"]
    monkeypatch.delenv("MUKI_FAULT_TEACHER")
    info = predict_stage(cfg, space, tmp_path / "run")
    assert info["computed"] == ["b"] and info["reused"] == ["a", "c"]


def test_a_teacher_whose_actors_cannot_be_placed_fails_within_its_timeout(tmp_path, tiny_models, ray_session, capsys):
    """On an autoscaling cluster whose autoscaler never adds a node that can hold a teacher's actor
    (here a custom resource no node has; with no node types published, the start-up check cannot know),
    the teacher fails after its placement_timeout_s with one line naming it, what it asked for and how
    long it waited, instead of waiting forever. The other teacher's cache is complete."""
    pool = write_pool(tmp_path / "pool.jsonl", 64)
    cfg, space = teachers_cfg(tmp_path, tiny_models, ["a", "b"], pool)
    raw = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    for t in raw["teachers"]:
        t["resources"]["num_gpus"] = 0
    raw["teachers"][1]["resources"].update(custom={"gone_node": 1}, placement_timeout_s=3)
    raw["ray"] = {"autoscaling": True}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    t0 = time.time()
    assert main(["predict-teachers", str(tmp_path / "cfg.yaml")]) == 1
    assert time.time() - t0 < 120
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert ("teacher 'b' failed: no actor could be placed in 3 s (teachers[].resources.placement_timeout_s): "
            "each asks for 0.5 CPU, 1 gone_node") in errors[0], errors
    assert sorted(cache_ids(cfg, space, 0)) == sorted(f"doc{i}" for i in range(64))
    assert cache_ids(cfg, space, 1) == []


def test_a_grown_pool_computes_only_its_new_and_changed_rows(tmp_path, tiny_models, ray_session):
    pool = write_pool(tmp_path / "pool.jsonl", 300)
    cfg, space = teachers_cfg(tmp_path, tiny_models, ["a", "b"], pool)
    first = predict_stage(cfg, space, tmp_path / "run")
    assert first["rows_computed"] == {"a": 300, "b": 300}
    before = {r["id"]: r["a__mc_score"] for r in pq.read_table(tmp_path / "run" / "predictions" / "data").to_pylist()}
    write_pool(pool, 30, start=300, seed=1)  # 30 new texts
    lines = pool.read_text().splitlines()
    lines[5] = json.dumps({"id": "doc5", "text": "a changed text about the market"})  # one text changed
    pool.write_text("\n".join(lines) + "\n")
    grown = predict_stage(cfg, space, tmp_path / "run")
    assert grown["rows"] == 330 and grown["rows_computed"] == {"a": 31, "b": 31}
    assert grown["rows_reused"] == {"a": 299, "b": 299}
    out = tmp_path / "run" / "predictions" / "data"
    after = {r["id"]: r["a__mc_score"] for r in pq.read_table(out).to_pylist()}
    assert all(after[k] == v for k, v in before.items() if k != "doc5")  # cached rows are reused as they were
    # The predictions' buckets that the grown pool holds whole are kept; only their new rows are
    # written (files part-B-1), and the bucket of the changed text is written whole.
    changed = bucket_of(["doc5"], cfg.data.buckets)[0]
    old_ids = [f"doc{i}" for i in range(300)]
    assert grown["rows_kept"] == 300 - int((bucket_of(old_ids, cfg.data.buckets) == changed).sum())
    written = {i for f in out.glob("part-*-1.parquet") for i in pq.read_table(f).column("id").to_pylist()}
    new_ids = [f"doc{i}" for i in range(300, 330)]
    assert written == {i for i, b in zip(new_ids, bucket_of(new_ids, cfg.data.buckets)) if b != changed}
    assert not (tmp_path / "run" / ".predictions.previous").exists()
    # ... and they are what a join from scratch writes.
    grown_table = pq.read_table(out).sort_by("id")
    shutil.rmtree(tmp_path / "run" / "predictions")
    assert predict_stage(cfg, space, tmp_path / "run")["rows_kept"] == 0
    assert pq.read_table(out).sort_by("id").equals(grown_table)


def test_diff_and_run_agree_on_what_reruns(tmp_path, tiny_models, ray_session, monkeypatch, capsys):
    """For a table of config changes, the stages `diff` says rerun are the stages `run` reruns.

    The stages are replaced by instant fakes that write real manifests, so `run`'s own skip logic
    (cache.stage_keys against the manifests) decides, not the test."""
    def fake(stage):
        def run_stage(cfg, space, run_dir):
            keys = stage_keys(cfg, space, run_dir, stage)
            extra = {"fingerprint": config_key(cfg, space, "pool")} if stage == "pool" else {}
            return finish_stage(begin_stage(Path(run_dir) / stage), config_hash=keys[0], inputs=keys[1], rows=1,
                                started=time.time(), extra=extra)
        return run_stage

    for stage in pipeline.STAGE_FUNCTIONS:
        monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, stage, fake(stage))
    monkeypatch.setattr(pipeline, "write_report", lambda cfg, space, run_dir: {"wall_time_s": 0.0, "results": []})
    pool = write_pool(tmp_path / "pool.jsonl", 20)
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"text": "market", "label": "business"}) + "\n")
    base = {"output_dir": str(tmp_path / "run"), "data": {"pool": {"source": str(pool)}, "dev": {"source": str(dev)}},
            "teachers": [{"name": "a", "model": str(tiny_models["news"]), "mc": {"samples": 2}},
                         {"name": "b", "model": str(tiny_models["arts"]), "mc": {"samples": 2}}],
            "integration": {"strategy": "muki_soft", "calibration": "rank", "prototypes": {"resources": {"replicas": 1}},
                            "refine": {}},
            "student": {"model": str(tiny_models["student"])}}
    space = LabelSpace.from_teachers({"a": ["business", "politics"], "b": ["entertainment", "sport", "tech"]})
    changes = [
        ("integration.prototypes.resources.replicas", 3, set()),
        ("student.lr", 1e-4, {"targets", "train", "evaluate"}),  # refine trains first students like the student
        ("integration.temperature", 0.5, {"targets", "train", "evaluate"}),
        ("teachers[0].mc.samples", 3, {"predictions", "targets", "train", "evaluate"}),
        ("teachers[1].resources.replicas", 2, set()),
        ("data.pool.limit", 10, {"pool", "predictions", "targets", "train", "evaluate"}),
        ("student.epochs", 2, {"targets", "train", "evaluate"}),
        ("integration.refine.resources.num_cpus", 0.5, set()),
        ("student.checkpoint_every_steps", 5, set()),  # how training survives failures changes no result
        ("student.max_failures", 2, set()),
    ]
    for key, value, expected in changes:
        a = parse_config(json.loads(json.dumps(base)))
        pipeline.run(a, space, tmp_path / "run")  # the base state
        raw = json.loads(json.dumps(base))
        node, *path = key.replace("]", "").replace("[", ".").split(".")
        target = raw[node]
        for p in path[:-1]:
            target = target[int(p)] if p.isdigit() else target.setdefault(p, {})
        target[path[-1]] = value
        b = parse_config(raw)
        plan = {line.split(":")[0]: line for line in plan_changes(a, space, b, space)}
        said = {s for s, line in plan.items() if s in pipeline.STAGE_FUNCTIONS and ": rerun" in line}
        done = pipeline.run(b, space, tmp_path / "run")
        ran = {s for s, info in done.items() if s != "report" and not info["skipped"]}
        assert said == ran == expected, (key, said, ran)


# ------------------------------------------------------------------ several nodes
MULTINODE = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 1024**2})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"teacher_slot": 1, "trainer_slot": 1}, object_store_memory=150 * 1024**2)
    cluster.wait_for_nodes()
    from muki_ray.run.cli import main
    code = main(["run", sys.argv[1], "--set", f"ray.address={cluster.address}"])
    ray.init(address=cluster.address, ignore_reinit_error=True)
    workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("teacher_slot")]
    print("RESULT " + json.dumps({"code": code, "workers": workers}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_several_nodes_run_end_to_end_with_teachers_and_training_workers_on_different_nodes(
        tmp_path, tiny_models, ray_session):
    def jsonl(name, rows):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    raw = {"data": {"pool": {"source": jsonl("pool.jsonl", toy_rows(64, 0))},
                    "dev": {"source": jsonl("dev.jsonl", toy_rows(8, 1))},
                    "test": {"source": jsonl("test.jsonl", toy_rows(8, 2))}, "buckets": 4},
           "teachers": [{"name": n, "model": str(tiny_models[m]), "labels": labels, "max_length": 16,
                         "mc": {"samples": 2}, "resources": {"num_cpus": 0.25, "custom": {"teacher_slot": 1}}}
                        for n, m, labels in (("news", "news", ["business", "politics"]),
                                             ("arts", "misc", ["entertainment", "sport"]))],
           "integration": {"preset": "paper"},  # the selection recipes are tested in test_prototypes
           # One training worker per node (gloo), checkpoints on a path every node shares.
           "student": {"model": str(tiny_models["student"]), "epochs": 1, "batch_size": 8, "max_length": 16,
                       "num_workers": 2, "resources_per_worker": {"CPU": 0.25, "trainer_slot": 1},
                       "eval_resources": {"num_cpus": 0.25}},
           "ray": {"storage_path": str(tmp_path / "shared" / "ray_train")}}
    multi, single = tmp_path / "multi.yaml", tmp_path / "single.yaml"
    multi.write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "multi")}))
    one = json.loads(json.dumps(raw))
    for t in one["teachers"]:
        t["resources"]["custom"] = {}
    one["student"]["resources_per_worker"] = {"CPU": 0.5}
    single.write_text(yaml.safe_dump({**one, "output_dir": str(tmp_path / "single")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", MULTINODE, str(multi)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert result["code"] == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nodes = read_manifest(tmp_path / "multi" / "predictions")["nodes"]
    news, arts = set(nodes["news"]), set(nodes["arts"])
    assert len(news) == len(arts) == 1 and news != arts and news | arts == set(result["workers"])
    created = next(r for r in train_log(tmp_path / "multi") if r.get("event") == "model_created")
    assert sorted(created["worker_nodes"]) == sorted(result["workers"])  # rank 0 and rank 1 on the two nodes
    assert any((tmp_path / "shared" / "ray_train").rglob("*.pt"))  # the checkpoints went to the shared path
    clf = transformers.pipeline("text-classification", model=str(tmp_path / "multi" / "student"), device="cpu")
    assert clf("market stock bank profit")[0]["label"] in {"business", "politics", "entertainment", "sport"}
    # The same targets on one node (predictions and targets only: the targets are what is compared).
    assert main(["predict-teachers", str(single)]) == 0 and main(["combine", str(single)]) == 0
    same = {r["id"]: r for r in pq.read_table(tmp_path / "single" / "targets" / "data").to_pylist()}
    for r in pq.read_table(tmp_path / "multi" / "targets" / "data").to_pylist():
        np.testing.assert_allclose(r["target"], same[r["id"]]["target"], atol=1e-6)
        assert r["teacher"] == same[r["id"]]["teacher"]


# A head with 1 CPU and one worker node with one `teacher_slot`, and what each script shares.
SLOT_CLUSTER = textwrap.dedent("""
    import json, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 1024**2})
    worker = cluster.add_node(num_cpus=1, resources={"teacher_slot": 1}, object_store_memory=150 * 1024**2)
    cluster.wait_for_nodes()

    def computed(teacher):  # rows the teacher stage's progress counter has from `teacher`
        names = [n for n in ray.util.list_named_actors() if n.startswith("muki-progress-")]
        return sum(ray.get(ray.get_actor(n).get.remote(teacher)) for n in names)
""")


def run_on_slot_cluster(script: str, cfg: Path, prefix: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run SLOT_CLUSTER + script on `cfg` in its own process; (the process, its RESULT line).

    Its own Ray temp dir: the Cluster writes the address file there, where no later ray.init() of
    this pytest would join it, whatever happens to the script (socket paths must stay < 108 bytes)."""
    ray_tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}, "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, "-c", SLOT_CLUSTER + script, str(cfg)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(line[7:])


LOST_NODE = textwrap.dedent("""
    lost = {}

    def lose_the_node():  # once teacher b's actor computes on the node, the node goes
        while not ray.is_initialized() or computed("b") == 0:
            time.sleep(0.2)
        here = ray.get_runtime_context().get_node_id()  # the counter must not go with the node (asked of the
        names = [n for n in ray.util.list_named_actors() if n.startswith("muki-progress-")]  # actor: no dashboard)
        lost["counters_here"] = [ray.get(ray.get_actor(n).__ray_call__.remote(
            lambda self: ray.get_runtime_context().get_node_id())) == here for n in names]
        cluster.remove_node(worker)
        lost["at"] = time.time()

    threading.Thread(target=lose_the_node, daemon=True).start()
    from muki_ray.run.cli import main
    code = main(["predict-teachers", sys.argv[1], "--set", f"ray.address={cluster.address}"])
    print("RESULT " + json.dumps({"code": code, "after_loss_s": time.time() - lost.get("at", time.time()),
                                  "counters_here": lost.get("counters_here")}), flush=True)
    ray.shutdown()
    cluster.shutdown()  # (it also removes the address file a later embedded ray.init would join)
    import os
    os._exit(0)  # the given-up teacher's thread still waits inside Ray Data: do not join it
""")


def test_a_teacher_that_loses_its_node_fails_within_its_timeout_and_the_other_keeps_its_cache(
        tmp_path, tiny_models):
    """Teacher b is pinned by a custom resource to the one worker node that has it; the node is removed
    while b computes. Ray Data would wait forever for b's actor to be restarted somewhere; b fails
    once no row has come for its placement_timeout_s, with one line naming it, what its actors ask
    for and how long; teacher a, on the head node, completes its cache."""
    pool = write_pool(tmp_path / "pool.jsonl", 3000)
    cfg, space = teachers_cfg(tmp_path, tiny_models, ["a", "b"], pool)
    raw = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    raw["teachers"][1]["resources"].update(custom={"teacher_slot": 1}, placement_timeout_s=40)
    for t in raw["teachers"]:
        t["batch_size"] = 16
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    proc, result = run_on_slot_cluster(LOST_NODE, tmp_path / "cfg.yaml", "mrln-")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert result["code"] == 1 and len(errors) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("teacher 'b' failed: no row computed for 40 s (teachers[].resources.placement_timeout_s): its actors "
            "could not be placed or restarted; each asks for 0.5 CPU, 1 teacher_slot") in errors[0], errors
    assert result["after_loss_s"] < 120, result
    assert result["counters_here"] == [True], result  # the stage's counter stayed on the driver's node
    assert sorted(cache_ids(cfg, space, 0)) == sorted(f"doc{i}" for i in range(3000))
    assert cache_ids(cfg, space, 1) == []


JOIN_NODE = textwrap.dedent("""
    out = {}

    def run():  # the stage in a thread: a node is added from the main thread (Ray's Node needs it)
        from muki_ray.run.cli import main
        out["code"] = main(["predict-teachers", sys.argv[1], "--set", f"ray.address={cluster.address}"])

    stage = threading.Thread(target=run, daemon=True)
    stage.start()
    while stage.is_alive() and (not ray.is_initialized() or computed("a") + computed("b") == 0):
        time.sleep(0.2)  # until the first teacher computes on the one slot
    node = cluster.add_node(num_cpus=1, resources={"teacher_slot": 1}, object_store_memory=150 * 1024**2)
    stage.join()
    print("RESULT " + json.dumps({"code": out.get("code"), "node": node.node_id}), flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


def test_a_node_that_joins_mid_stage_starts_the_waiting_teacher_on_it(tmp_path, tiny_models):
    """A fixed-size cluster with one `teacher_slot`, two teachers that each ask for one: the second
    waits. A second slot's node is added while the first computes; the waiting teacher starts on it
    before the first has ended, instead of after it on the first node."""
    pool = write_pool(tmp_path / "pool.jsonl", 3000)
    cfg, space = teachers_cfg(tmp_path, tiny_models, ["a", "b"], pool, custom={"teacher_slot": 1})
    raw = yaml.safe_load((tmp_path / "cfg.yaml").read_text())
    for t in raw["teachers"]:
        t["batch_size"] = 16
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    proc, result = run_on_slot_cluster(JOIN_NODE, tmp_path / "cfg.yaml", "mrjn-")
    assert result["code"] == 0 and result["node"], proc.stdout[-3000:] + proc.stderr[-3000:]
    m = read_manifest(tmp_path / "run" / "predictions")
    first, second = sorted(m["schedule"], key=lambda n: m["schedule"][n]["start"])
    when = {n: m["schedule"][n] for n in (first, second)}
    assert when[second]["start"] < when[first]["end"], when  # side by side once the node joined
    assert list(m["nodes"][second]) == [result["node"]], m["nodes"]  # on the node that joined
    assert list(m["nodes"][first]) != [result["node"]], m["nodes"]
    for i in range(2):
        assert sorted(cache_ids(cfg, space, i)) == sorted(f"doc{j}" for j in range(3000))


# ------------------------------------------------------------------ the driver's memory
RSS = textwrap.dedent("""
    import json, resource, sys
    import ray
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    from muki_ray.run.cli import main
    assert main(["predict-teachers", sys.argv[1]]) == 0
    assert main(["combine", sys.argv[1]]) == 0
    print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


@pytest.mark.ray  # (its subprocesses start their own Ray)
def test_driver_memory_does_not_grow_with_the_pool(tmp_path, tiny_models):
    peaks = {}
    for n in (1000, 10000):
        d = tmp_path / str(n)
        d.mkdir()
        pool = write_pool(d / "pool.jsonl", n)
        raw = {"output_dir": str(d / "run"), "data": {"pool": {"source": str(pool)}},
               "teachers": [{"name": t, "model": str(tiny_models["news"]), "labels": ["business", "politics"],
                             "batch_size": 1024, "max_length": 16, "mc": {"samples": 1},
                             "resources": {"num_cpus": 1}} for t in ("a", "b")],
               "integration": {"preset": "paper", "calibration": "rank"}, "student": {"model": str(tiny_models["student"])}}
        (d / "cfg.yaml").write_text(yaml.safe_dump(raw))
        proc = subprocess.run([sys.executable, "-c", RSS, str(d / "cfg.yaml")], cwd=REPO, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[n] = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("RSS ")))
    assert peaks[10000] - peaks[1000] < 150, peaks
