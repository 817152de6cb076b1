"""Student training through Ray Train + DeepSpeed on tiny models (CPU, gloo)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline

from muki_ray.student.checkpoint import _groups
from muki_ray.config.schema import parse_config
from muki_ray.config.labels import LabelSpace
from muki_ray.core.manifest import finish_stage
from muki_ray.run.pipeline import evaluate_stage, train_stage
from tests.conftest import make_tiny_model

UNION = ["business", "politics", "entertainment", "sport"]
SPACE = LabelSpace.from_teachers({"news": ["business", "politics"], "arts": ["entertainment", "sport"]})
TOPIC_WORDS = {"business": "market stock bank profit", "politics": "election minister party vote",
               "entertainment": "film music star award", "sport": "game team match player"}


def toy_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = UNION[i % 4]
        words = rng.choice(TOPIC_WORDS[label].split(), size=4).tolist() + rng.choice(["the", "a", "of"], 3).tolist()
        rows.append({"id": f"{seed}-{i}", "text": " ".join(rng.permutation(words)), "label": label})
    return rows


def prepare(tmp_path, strategy="muki_soft", n=64, zero=2, workers=2, epochs=2, weights=None, base_labels=UNION,
            **student):
    """Fake targets (one-hot of the toy label, so the task is learnable) and a labeled dev split."""
    run = tmp_path / "run"
    rows = toy_rows(n, 0)
    gold = SPACE.encode([r["label"] for r in rows])
    targets = np.eye(4)[gold] * 0.9 + 0.025
    cols = {"id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
            "target": [list(t) for t in targets],
            "weight": list(np.ones(n) if weights is None else weights),
            "teacher": ["news" if g < 2 else "arts" for g in gold], "scores": [[0.5, 0.5]] * n,
            "gold": gold.tolist(),
            "news__probs": [list(t[:2] / t[:2].sum()) for t in targets],
            "arts__probs": [list(t[2:] / t[2:].sum()) for t in targets]}
    (run / "targets" / "data").mkdir(parents=True)
    pq.write_table(pa.table(cols), run / "targets" / "data" / "part-0.parquet")
    finish_stage(run / "targets", config_hash="t", inputs={}, rows=n, started=0.0)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(24, 1)))
    student_dir = make_tiny_model(tmp_path / "student", base_labels, "bert", seed=5, hidden_dropout=0.0)
    raw = {
        "output_dir": str(run),
        "data": {"pool": {"source": str(dev)}, "dev": {"source": str(dev)}, "test": {"source": str(dev)},
                 "pool_gold_labels": True},
        "teachers": [{"name": "news", "model": "x", "labels": ["business", "politics"]},
                     {"name": "arts", "model": "x", "labels": ["entertainment", "sport"]}],
        "integration": {"strategy": strategy, "preset": "paper"},
        "student": {"model": str(student_dir), "epochs": epochs, "batch_size": 8, "zero_stage": zero,
                    "num_workers": workers, "resources_per_worker": {"CPU": 0.5}, "max_length": 16,
                    "warmup_ratio": 0.0, **{"lr": 5e-3, **student}},
    }
    return parse_config(raw), run


def train_log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_stage_trains_and_exports(tmp_path, ray_session, zero, monkeypatch):
    import deepspeed.utils.zero_to_fp32 as consolidation  # here: DeepSpeed's import takes seconds at collection

    # The export runs on the workers: the driver never consolidates a checkpoint.
    monkeypatch.setattr(consolidation, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda *a, **k: pytest.fail("the driver consolidated a checkpoint"))
    # The base's head has 2 labels: the union's head (4) is created fresh, which transformers'
    # ZeRO-3 loading cannot do by itself. Under ZeRO-3 the workers also warm-start, partitioned,
    # from a previous 4-label student.
    extra = {}
    if zero == 3:
        extra["init_from"] = str(make_tiny_model(tmp_path / "previous", list(reversed(UNION)), "bert", seed=6))
        # A few thousand parameters live at a time (the tiny model has ~25k): the export is several shards.
        (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage3_max_live_parameters": 4000}}))
        extra["deepspeed_config"] = str(tmp_path / "ds.json")
    cfg, run = prepare(tmp_path, zero=zero, n=128, epochs=3, lr=1e-2, base_labels=["x", "y"], **extra)
    info = train_stage(cfg, SPACE, run)
    evaluate_stage(cfg, SPACE, run)
    steps = [r for r in train_log(run) if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] * 0.7, steps  # the toy set is learnable
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dev_accuracy"] > 0.4 and "test_accuracy" in metrics  # chance: 0.25
    assert set(metrics["test_accuracy_per_teacher"]) == {"news", "arts"}
    assert info["metrics"]["best_epoch"] in (0, 1, 2)
    created = next(r for r in train_log(run) if r.get("event") == "model_created")
    if zero == 3:  # partitioned creation: with 2 workers each rank holds about half the parameters
        assert 0.4 < created["local_fraction"] < 0.6, created
        # fp32: the optimizer's master partitions are the parameter partitions, not a second copy
        shared = next(r for r in train_log(run) if r.get("event") == "fp32_partitions_shared")
        assert 0.4 * created["parameters"] < shared["elements"] <= created["local_parameters"], (shared, created)
        warm = next(r for r in train_log(run) if r.get("event") == "warm_start")
        assert warm["head"] == ["classifier.bias", "classifier.weight"] and warm["copied_labels"] == UNION
        assert warm["tensors"] == len(load_file(str(tmp_path / "previous" / "model.safetensors")))
        # Exported shard by shard (a few layers gathered at a time), with the index that maps them.
        index = json.loads((run / "student" / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in (run / "student").glob("model-*.safetensors"))
        assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    else:
        assert created["local_fraction"] == 1.0, created
    clf = pipeline("text-classification", model=str(run / "student"), device="cpu")
    preds = clf(["market stock bank profit", "film music star award"])
    assert {p["label"] for p in preds} <= set(UNION)


def test_rerun_resumes_from_checkpoint(tmp_path, ray_session, monkeypatch):
    # uhc's loss through the trainer; ZeRO-3, so its partitions (shared fp32 master, checkpointed) resume too
    cfg, run = prepare(tmp_path, strategy="uhc", zero=3, workers=1, epochs=2)
    per_epoch = 64 // 8
    monkeypatch.setenv("MUKI_FAULT_TRAIN_STEP", f"{2 * per_epoch - 1}:{tmp_path / 'failed-once'}")
    with pytest.raises(Exception):
        train_stage(cfg, SPACE, run)  # dies in epoch 2, after the epoch-1 checkpoint
    assert (tmp_path / "failed-once").exists()
    train_stage(cfg, SPACE, run)
    epochs = [r for r in train_log(run) if r.get("event") == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]  # epoch 0 was not trained again
    assert epochs[-1]["global_step"] == 2 * per_epoch
    resumed = [r for r in train_log(run) if "loss" in r and r["epoch"] == 1]
    assert resumed[0]["global_step"] > per_epoch
    assert np.isfinite(resumed[-1]["loss"]) and resumed[-1]["loss"] > 0


def test_zero_weight_rows_leave_the_model_unchanged_and_a_pool_under_one_batch_still_steps(tmp_path, ray_session):
    # 5 rows, fewer than one batch of 8: the batch shrinks to 5, so the epoch still takes its step.
    cfg, run = prepare(tmp_path, n=5, zero=0, workers=1, epochs=1, weights=np.zeros(5), weight_decay=0.0,
                       resources_per_worker={"CPU": 1.5})
    train_stage(cfg, SPACE, run)
    epochs = [r for r in train_log(run) if r.get("event") == "epoch"]
    assert [r["global_step"] for r in epochs] == [1]
    # The worker uses the CPUs Ray assigned it (1.5 -> 2 threads), not Ray's OMP_NUM_THREADS=1.
    assert [r["torch_threads"] for r in epochs] == [2]

    before = load_file(str(tmp_path / "student" / "model.safetensors"))
    after = load_file(str(run / "student" / "model.safetensors"))
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed == []


def test_other_losses_run_through_the_same_trainer(tmp_path, ray_session):
    """supervised here; uhc in the resume test above, vanilla_kd in test_faults' mid-epoch resume
    (each strategy's loss runs through the one trainer without a Ray Train run of its own)."""
    cfg, run = prepare(tmp_path, strategy="supervised", n=16, zero=0, workers=1, epochs=1)
    info = train_stage(cfg, SPACE, run)
    steps = [r for r in train_log(run) if "loss" in r]
    assert steps and np.isfinite(steps[-1]["loss"]) and steps[-1]["loss"] > 0
    assert info["metrics"]["global_step"] == 2


def test_zero3_export_groups_stay_under_the_limit_in_order():
    """The ZeRO-3 export gathers one group at a time: groups keep state-dict order, count a partitioned
    parameter by its full size (`ds_numel`), and a tensor over the limit is a group of its own."""
    big = torch.nn.Parameter(torch.zeros(1))
    big.ds_numel = 9  # a ZeRO-3 partition of 1 element standing for 9
    tensors = [("a", torch.zeros(3)), ("b", torch.zeros(4)), ("c", big), ("d", torch.zeros(1)), ("e", torch.zeros(5))]
    assert [[n for n, _ in g] for g in _groups(tensors, 7)] == [["a", "b"], ["c"], ["d", "e"]]
    assert list(_groups([], 7)) == []


def test_the_optimizer_needs_no_compiler_on_gpu_or_with_offload():
    """DeepSpeed's FusedAdam (GPU) and CPUAdam (offload) compile an extension at first use; the
    student's config asks for torch's AdamW everywhere, so no image needs nvcc or ninja."""
    from muki_ray.config.schema import StudentConfig
    from muki_ray.student.training import deepspeed_config

    for use_gpu in (False, True):
        hyper = StudentConfig(model="m", zero_stage=3, offload_optimizer=True, use_gpu=use_gpu, lr=1e-3)
        ds = deepspeed_config(hyper, use_gpu=use_gpu, bf16=use_gpu, total_steps=10)
        assert ds["optimizer"]["params"]["torch_adam"] is True
        assert ds["zero_force_ds_cpu_optimizer"] is False
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_an_offloaded_optimizer_trains_without_a_compiled_extension(tmp_path, ray_session):
    """ZeRO-2 with the optimizer offloaded to the CPU, on torch's AdamW (no CPUAdam build)."""
    cfg, run = prepare(tmp_path, zero=2, workers=1, n=64, epochs=3, lr=1e-2, base_labels=["x", "y"],
                       offload_optimizer=True)
    train_stage(cfg, SPACE, run)
    steps = [r for r in train_log(run) if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] * 0.7, steps
