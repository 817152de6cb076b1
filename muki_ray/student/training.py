"""Distributed training of a classifier with Ray Train (TorchTrainer) and DeepSpeed ZeRO.

Used twice: the student on the integrated targets, and (in `prepare`) each teacher on gold
labels of its own label subset. Tokenization happens in a Ray Data stage before the trainer;
`train_loop_per_worker` reads top to bottom: build model -> deepspeed.initialize -> resume ->
epochs (train, evaluate on dev, export when dev accuracy is the best so far, report with
checkpoint). The model's creation, checkpoints and export are in checkpoint.py: under ZeRO-3 each
rank creates only its shard, and the export gathers the 16-bit weights a group at a time to rank 0,
which writes the `from_pretrained` folder shard by shard. The driver never builds the model or
reads the checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from muki_ray.core import faults
from muki_ray.student.checkpoint import append_log, build_model, local_parameters, save_checkpoint, save_student
from muki_ray.core.cluster import default_max_failures
from muki_ray.core.hf_folder import load_tokenizer
from muki_ray.core.progress import advance, track

log = logging.getLogger("muki_ray.student.training")

# ------------------------------------------------------------------ config
def deepspeed_config(hyper, *, use_gpu: bool, bf16: bool, total_steps: int, user: Optional[dict] = None,
                     hidden: Optional[int] = None) -> dict:
    """The DeepSpeed config for `hyper` (a TrainHyper); `user` keys override ours (deep merge).

    `hidden`: the model's hidden size. ZeRO's communication buckets are then sized from it as
    transformers' DeepSpeed integration does for "auto" (hidden², ...): DeepSpeed's defaults
    (5e8 elements, 2 GB each in fp32) would cost more than the partitioning saves on a mid-size model.
    """
    warmup = int(round(hyper.warmup_ratio * total_steps))
    zero: dict = {"stage": hyper.zero_stage}
    if hyper.offload_optimizer and hyper.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if hidden and hyper.zero_stage in (2, 3):
        zero["reduce_bucket_size"] = hidden * hidden
    if hidden and hyper.zero_stage == 2:
        zero["allgather_bucket_size"] = hidden * hidden
    if hidden and hyper.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                    stage3_param_persistence_threshold=10 * hidden,
                    stage3_max_live_parameters=30 * hidden * hidden,  # about 2.5 transformer layers
                    # DeepSpeed's 1e9 default keeps every parameter gathered in the forward pass until the
                    # backward reuses it: the whole model on every rank (measured: +1.4 GB per step on a
                    # 335 M student). Re-gather instead, and step the optimizer in sub-groups of the same
                    # size, so its flattened gradient copy and AdamW's temporaries are a few layers, not the shard.
                    stage3_max_reuse_distance=30 * hidden * hidden, sub_group_size=30 * hidden * hidden)
    if hyper.zero_stage == 3:
        # Gather the full weights at save time as well; export also works from the shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": hyper.batch_size,
        "gradient_accumulation_steps": hyper.grad_accum,
        "gradient_clipping": hyper.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW everywhere: DeepSpeed's FusedAdam (GPU) and CPUAdam (offload) are C++/CUDA
            # extensions compiled at first use, which needs nvcc or a C++ compiler and ninja in the image.
            "params": {"lr": hyper.lr, "weight_decay": hyper.weight_decay, "betas": [0.9, 0.999],
                       "eps": 1e-8, "torch_adam": True},
        },
        # With offload_optimizer, accept torch's AdamW on the CPU partitions instead of requiring CPUAdam.
        "zero_force_ds_cpu_optimizer": False,
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": hyper.lr, "warmup_num_steps": max(warmup, 1),
                       "total_num_steps": max(total_steps, warmup + 1), "warmup_type": "linear"},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(cfg, user or {})


def hidden_size(model_path: str) -> Optional[int]:
    """The hidden size in a model folder's config.json (None when it names none)."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return next((int(cfg[k]) for k in ("hidden_size", "dim", "d_model", "n_embd") if isinstance(cfg.get(k), int)),
                None)


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class TrainJob:
    """Everything the workers need; plain data so it ships to every worker."""

    model_path: str
    labels: list[str]                       # output label names, head order
    loss: str                               # a class in losses.py (a strategy's row names it)
    hyper: dict                             # TrainHyper as a dict
    ds_config: dict
    steps_per_epoch: int                    # optimizer micro-steps per worker per epoch
    log_path: Optional[str] = None          # train_log.jsonl (rank 0 writes)
    run_name: str = ""                      # the Ray Train run: tags its train_log.jsonl lines
    loss_context: dict = field(default_factory=dict)  # losses.LossContext's fields
    part_labels: dict[str, list[int]] = field(default_factory=dict)  # part name -> union indices
    trust_remote_code: bool = False
    allow_pickle: bool = False
    init_from: Optional[str] = None         # warm start: a previous student folder (head grown by label name)
    init_head: Optional[str] = None         # warm start: the probed union head (warm_start.probe_warm_head)
    fault_step: Optional[str] = None        # test-only hooks (faults.py)
    trace_rows: Optional[str] = None
    progress: Optional[str] = None          # the stage's progress counter (progress.track): rank 0 adds steps
    out_dir: Optional[str] = None           # the exported from_pretrained folder (rank 0 writes it)


# ------------------------------------------------------------ tokenization
@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str, trust_remote_code: bool):

    return load_tokenizer(model_path, trust_remote_code=trust_remote_code)


def tokenize_batch(batch: dict, model_path: str, max_length: int, trust_remote_code: bool = False) -> dict:
    """Ray Data batch function: text -> fixed-width input_ids/attention_mask[/token_type_ids].

    Fixed width keeps Arrow tensor columns simple; `collate` trims each batch to its longest
    row, so no FLOPs go to padding beyond that. The tokenizer is cached per worker process.
    """
    enc = _tokenizer(model_path, trust_remote_code)([str(t) for t in batch["text"]], truncation=True,
                                                    max_length=max_length, padding="max_length",
                                                    return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in enc:
            batch[key] = enc[key].astype(np.int32)  # half the object-store footprint of int64
    del batch["text"]
    return batch


def tokenize(ds, model_path: str, max_length: int, trust_remote_code: bool = False):
    """Task-based tokenization stage. Tasks (not an actor pool) with a small CPU share, so the
    training workers plus this stage never claim every CPU (a starved read hangs: ray#44687)."""
    return ds.map_batches(tokenize_batch, fn_kwargs={"model_path": model_path, "max_length": max_length,
                                                     "trust_remote_code": trust_remote_code},
                          batch_size=256, batch_format="numpy", num_cpus=0.25)


def collate(batch: dict, device) -> dict:
    """numpy batch -> torch tensors on `device`, trimmed to the longest row."""
    import torch

    width = int(batch["attention_mask"].sum(axis=1).max()) if len(batch["attention_mask"]) else 1
    out = {}
    for k, v in batch.items():
        if k in ("input_ids", "attention_mask", "token_type_ids"):
            out[k] = torch.as_tensor(np.ascontiguousarray(v[:, :width]), dtype=torch.long, device=device)
        elif k in ("id", "text", "teacher", "label", "scores"):
            continue
        elif v.dtype == object:
            out[k] = torch.as_tensor(np.stack(v).astype(np.float32), device=device)
        else:  # Ray hands out read-only views of its blocks; torch wants memory it may write
            out[k] = torch.as_tensor(np.require(v, requirements="W"), device=device)
    return out


# ------------------------------------------------------------ train loop
def train_loop_per_worker(config: dict) -> None:
    import deepspeed  # inside the worker: importing at module top costs every process ~seconds
    import ray
    import ray.train
    import torch

    from muki_ray.method import losses
    from muki_ray.core.hardware import pick_device, release_freed_memory, student_bf16, worker_threads

    job = TrainJob(**config["job"])
    hyper = job.hyper
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(hyper["seed"])
    release_freed_memory()
    if not hyper["use_gpu"]:
        torch.set_num_threads(worker_threads())

    # 1. Model: the union label head; under ZeRO-3 created partitioned (`partitioned` must stay
    #    alive while the engine runs: transformers reads the ZeRO-3 state through it).
    bf16 = job.ds_config.get("bf16", {}).get("enabled", False)
    if bf16 and hyper["precision"] != "fp32":  # decided here, on the worker's own GPU (the driver may have none)
        bf16, note = student_bf16(hyper["precision"], pick_device())
        if note and rank == 0:
            log.warning(note)
        job.ds_config["bf16"]["enabled"] = bf16
    model, partitioned = build_model(job, rank, dtype=torch.bfloat16 if bf16 else None)
    local, total = local_parameters(model)
    nodes = [ray.get_runtime_context().get_node_id()] * world
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(nodes, nodes[0])
    if rank == 0:
        log.info("model created: %d parameters, %d on this rank (%.2f); %d workers on %d nodes", total, local,
                 local / max(total, 1), world, len(set(nodes)))
        append_log(job, {"event": "model_created", "parameters": total, "local_parameters": local,
                                   "local_fraction": local / max(total, 1), "rss_mb": _peak_rss_mb(),
                                   "worker_nodes": nodes})

    # 2. DeepSpeed engine (Ray Train has already set up the process group: NCCL or gloo).
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           config=job.ds_config)
    device = engine.device
    if rank == 0:
        append_log(job, {"event": "engine", "device": str(device), "bf16": bool(bf16),
                         "optimizer": type(engine.optimizer).__name__})
    shared = _share_fp32_partitions(engine)
    if rank == 0 and shared:
        append_log(job, {"event": "fp32_partitions_shared", "elements": shared, "rss_mb": _peak_rss_mb()})

    # 3. Resume from the latest checkpoint: an epoch's end, or a step inside it (after a worker failure,
    #    or a rerun of the same run). `skip` micro-batches of that epoch were trained already.
    start_epoch, skip, global_step = 0, 0, 0
    best = {"dev_accuracy": -1.0, "epoch": None, "metrics": {}}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="state")
        start_epoch, skip, global_step, best = client["epoch"], client["step"], client["global_step"], client["best"]
        if skip >= job.steps_per_epoch:
            start_epoch, skip = start_epoch + 1, 0
        if rank == 0:
            log.info("resumed from checkpoint at epoch %d step %d, global step %d", start_epoch, skip, global_step)
            append_log(job, {"event": "resumed", "epoch": start_epoch, "step": skip,
                                       "global_step": global_step})

    loss_fn = getattr(losses, job.loss).build(losses.LossContext(**job.loss_context)).to(device)

    train_shard = ray.train.get_dataset_shard("train")
    dev_shard = ray.train.get_dataset_shard("dev")
    micro = hyper["batch_size"]
    # Step checkpoints fall on optimizer-step boundaries: every N optimizer steps = N * grad_accum micro-steps.
    every = (hyper["checkpoint_every_steps"] or 0) * hyper["grad_accum"]
    for epoch in range(start_epoch, hyper["epochs"]):
        # 4. One epoch: every rank takes exactly steps_per_epoch micro-batches (ZeRO needs lockstep). The
        #    shard's order is the same on every attempt (preserve_order, seeded local shuffle), so a
        #    resumed epoch skips exactly the rows trained before its checkpoint.
        engine.train()
        meter = EpochMeter(world)
        batches = train_shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True,
                                           local_shuffle_buffer_size=max(4 * micro, 256),
                                           local_shuffle_seed=hyper["seed"] + epoch)
        for step, np_batch in enumerate(batches):
            if step >= job.steps_per_epoch:
                break
            if step < skip:
                continue
            loss = _loss_step(engine, loss_fn, collate(np_batch, device))
            global_step += 1
            meter.add(len(np_batch["input_ids"]), loss.item())
            if rank == 0 and (global_step % 10 == 0 or step == job.steps_per_epoch - 1):
                rec = {"epoch": epoch, "global_step": global_step, "loss": meter.recent_loss(),
                       "lr": float(engine.get_lr()[0]), "examples_per_s": round(meter.rate(), 2)}
                log.info("epoch %d step %d/%d loss %.4f lr %.2e %.1f ex/s", epoch, step + 1,
                         job.steps_per_epoch, rec["loss"], rec["lr"], rec["examples_per_s"])
                append_log(job, rec)
            if rank == 0:
                advance(job.progress)
            faults.trace_step(job.trace_rows, rank, epoch, step, np_batch)
            if every and global_step % every == 0 and step + 1 < job.steps_per_epoch:
                save_checkpoint(engine, {"epoch": epoch, "step": step + 1, "global_step": global_step, "best": best},
                            {"epoch": epoch, "step": step + 1, "global_step": global_step,
                             "train_loss": meter.mean_loss()})
            faults.train_step(global_step, job.fault_step, rank)
        skip = 0
        meter.end_training()
        # 5. Dev evaluation (every rank evaluates its shard; counts are summed).
        dev = evaluate_shard(engine, dev_shard, job, device, bf16)
        metrics = {"epoch": epoch, "global_step": global_step, **meter.summary(),
                   "torch_threads": torch.get_num_threads(), **dev}
        # 6. Export the best epoch so far on dev (ties keep the earlier epoch), from the workers.
        if dev["dev_accuracy"] > best["dev_accuracy"]:
            best = {"dev_accuracy": dev["dev_accuracy"], "epoch": epoch, "metrics": metrics}
            save_student(engine, job, rank)
        metrics.update(best_epoch=best["epoch"], best_dev_accuracy=best["dev_accuracy"])
        if rank == 0:
            log.info("epoch %d done: %s", epoch, json.dumps(metrics))
            append_log(job, {"event": "epoch", **metrics})
        # 7. Checkpoint at the epoch's end.
        save_checkpoint(engine, {"epoch": epoch, "step": job.steps_per_epoch, "global_step": global_step, "best": best},
                    metrics)


def _share_fp32_partitions(engine) -> int:
    """ZeRO-3 without mixed precision: make the optimizer's fp32 "master" partitions the parameter
    partitions themselves, which DeepSpeed means to do when they have the same dtype and device
    (stage3.py: "we don't need another copy of the weights") but does not, as its check compares a
    torch.device with a device-name string, never equal. Without this every rank keeps a second
    copy of its shard (670 MB per rank on the 335 M student of benchmarks/student_memory.py); the
    optimizer updates the shared storage in place, and DeepSpeed's copy back becomes a self-copy
    (losses identical step by step). Returns the elements shared (0 under bf16 or offload)."""
    opt = engine.optimizer
    shared = 0
    for low, master in zip(getattr(opt, "fp16_partitioned_groups_flat", []),
                           getattr(opt, "fp32_partitioned_groups_flat", [])):
        if (low.dtype, low.device, low.shape) == (master.dtype, master.device, master.shape) \
                and low.data_ptr() != master.data_ptr():
            master.data = low.data
            shared += low.numel()
    return shared


class EpochMeter:
    """One epoch's losses and throughput on this rank; rates in examples/s over all `world` ranks."""

    def __init__(self, world: int):
        self.world, self.t0, self.seen, self.losses = world, time.time(), 0, []
        self.t_steady, self.seen_steady = None, 0  # from the end of the first step: start-up excluded
        self.train_s = 0.0

    def add(self, rows: int, loss: float) -> None:
        self.seen += rows
        self.losses.append(loss)
        if self.t_steady is None:
            self.t_steady, self.seen_steady = time.time(), self.seen

    def recent_loss(self, n: int = 10) -> float:
        return float(np.mean(self.losses[-n:]))

    def mean_loss(self) -> float:
        return float(np.mean(self.losses or [0.0]))

    def rate(self) -> float:
        return self.seen * self.world / max(time.time() - self.t0, 1e-9)

    def end_training(self) -> None:
        self.train_s = time.time() - self.t0

    def summary(self) -> dict:
        steady_s = self.t0 + self.train_s - (self.t_steady or self.t0)
        return {"train_loss": self.mean_loss(), "epoch_time_s": round(time.time() - self.t0, 2),
                "examples_per_s": round(self.seen * self.world / max(self.train_s, 1e-9), 2),
                "examples_per_s_steady": round((self.seen - self.seen_steady) * self.world / max(steady_s, 1e-9), 2),
                "peak_rss_mb": _peak_rss_mb()}


def _loss_step(engine, loss_fn, batch: dict):
    """One micro-step: forward, loss_fn(logits (B, Y), batch), backward, and the optimizer step
    (DeepSpeed applies it at gradient-accumulation boundaries). Returns the loss, a scalar tensor."""
    loss = loss_fn(engine(**_model_inputs(batch)).logits.float(), batch)
    engine.backward(loss)
    engine.step()
    return loss


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def evaluate_shard(engine, shard, job: TrainJob, device, bf16: bool) -> dict:
    """Dev accuracy over the union and per part, summed over ranks. `gold` = union index."""
    import torch
    import torch.distributed as dist

    engine.eval()
    parts = list(job.part_labels)
    counts = torch.zeros(2 + 2 * len(parts), dtype=torch.float64, device=device)
    masks = {p: torch.zeros(len(job.labels), dtype=torch.bool, device=device) for p in parts}
    for p, idx in job.part_labels.items():
        masks[p][idx] = True
    with torch.no_grad():
        for np_batch in shard.iter_batches(batch_size=64, batch_format="numpy"):
            batch = collate(np_batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                pred = engine(**_model_inputs(batch)).logits.float().argmax(-1)
            gold = batch["gold"]
            ok = (pred == gold) & (gold >= 0)
            counts[0] += ok.sum()
            counts[1] += (gold >= 0).sum()
            for j, p in enumerate(parts):
                inpart = (gold >= 0) & masks[p][gold.clamp(min=0)]
                counts[2 + 2 * j] += (ok & inpart).sum()
                counts[3 + 2 * j] += inpart.sum()
    if dist.is_initialized():
        dist.all_reduce(counts)
    c = counts.cpu().numpy()
    out = {"dev_accuracy": float(c[0] / c[1]) if c[1] else float("nan"), "dev_rows": int(c[1])}
    for j, p in enumerate(parts):
        out[f"dev_accuracy/{p}"] = float(c[2 + 2 * j] / c[3 + 2 * j]) if c[3 + 2 * j] else float("nan")
    return out


def _peak_rss_mb() -> float:
    """Peak resident memory of this worker process, MiB (Linux ru_maxrss is KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ----------------------------------------------------------------- driver
def fit(job: TrainJob, train_ds, dev_ds, *, run_dir: Path, name: str, num_rows: int, scaling: dict,
        max_failures: int, storage_path: Optional[str] = None) -> dict:
    """Run the TorchTrainer; returns the exported (best) epoch's metrics and the last ones."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from muki_ray.core.hardware import collective_backend

    # Checkpoints go to shared storage on a cluster: a shared path or an object-store URI.
    storage = storage_path or str(Path(run_dir).resolve() / "ray_train")
    # The train shards keep their order (and so their rows) on every attempt: a step checkpoint names a
    # position in that order. Ray Data drops locality hints under preserve_order for the same reason.
    ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": asdict(job)},
        torch_config=TorchConfig(backend=collective_backend(scaling["use_gpu"])),
        scaling_config=ScalingConfig(**scaling),
        dataset_config=DataConfig(execution_options={"train": ordered}),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            # The latest two: resuming needs the last; the best epoch is exported by the workers already.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": train_ds, "dev": dev_ds},
    )
    last = trainer.fit().metrics
    best = {k[len("best/"):]: v for k, v in last.items() if k.startswith("best/")}
    return {"metrics": best or last, "last_metrics": last}


def steps_per_epoch(num_rows: int, world: int, micro: int) -> int:
    """Micro-steps every worker can take on its equal shard, dropping the ragged tail (0 when a
    shard is smaller than one micro-batch: `train_classifier` shrinks the batch first)."""
    return (num_rows // world) // micro


# ----------------------------------------------------------------- one fit, end to end
def with_gold(ds, names):
    """{..., label} -> {..., gold}: the label's index in `names` (-1 when absent)."""
    import pyarrow as pa

    from muki_ray.data.sources import io_map  # data imports Ray Data, which the training workers need not load

    index = {n: i for i, n in enumerate(names)}

    def encode(batch: "pa.Table") -> "pa.Table":
        gold = [index.get(x, -1) for x in batch.column("label").to_pylist()]
        return batch.append_column("gold", pa.array(gold, type=pa.int64())).drop(["label"])

    return ds.map_batches(encode, batch_format="pyarrow", **io_map())


def training_request(hyper) -> dict[str, float]:
    """Ray resources one training run holds while it runs: every worker's, GPUs included."""
    per_worker = {k: float(v) for k, v in dict(hyper.resources_per_worker).items()}
    if hyper.use_gpu:
        per_worker["GPU"] = per_worker.get("GPU", 1.0)
    per_worker.setdefault("CPU", 1.0)  # Ray Train's default worker bundle
    return {k: v * hyper.num_workers for k, v in per_worker.items()}


def train_classifier(hyper, *, model_path: str, labels: list[str], loss: str, train_ds, dev_ds, rows: int,
                     run_dir: Path, name: str, out_dir: Path, parts: dict, trust_remote_code=False,
                     allow_pickle=False, storage_path=None, progress: Optional[str] = None, **job_extra) -> dict:
    """Ray Train + DeepSpeed fit of a classifier over `labels`, exported to `out_dir` (HF folder).

    Shared by the student (KD losses), the refine first students and the prepared teachers
    (cross-entropy on gold labels). dev_ds: a labeled Ray Dataset {text, label}. `progress`: the
    label of its progress line (default: the run name).
    """
    shard = rows // hyper.num_workers
    if shard < 1:
        from muki_ray.data.sources import DataError  # not at the top: the training workers need not load Ray Data

        raise DataError(f"train {name}: {rows} training rows cannot feed num_workers={hyper.num_workers} workers")
    if shard < hyper.batch_size:  # else drop_last would leave every epoch with no step at all
        log.debug("train %s: %d rows per worker, fewer than batch_size %d: one batch of %d per epoch", name, shard,
                 hyper.batch_size, shard)
        hyper = hyper.model_copy(update={"batch_size": shard})
    per_epoch = steps_per_epoch(rows, hyper.num_workers, hyper.batch_size)
    total_opt_steps = -(-per_epoch // hyper.grad_accum) * hyper.epochs
    bf16 = hyper.precision == "bf16" or (hyper.precision == "auto" and hyper.use_gpu)
    user_ds = json.loads(Path(hyper.deepspeed_config).read_text()) if hyper.deepspeed_config else None
    job = TrainJob(
        model_path=model_path, labels=list(labels), loss=loss, hyper=hyper.model_dump(),
        ds_config=deepspeed_config(hyper, use_gpu=hyper.use_gpu, bf16=bf16, total_steps=total_opt_steps,
                                   user=user_ds, hidden=hidden_size(model_path)),
        steps_per_epoch=per_epoch, log_path=str(Path(run_dir) / "train_log.jsonl"), run_name=name, part_labels=parts,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        **faults.train_hooks(),
        out_dir=str(Path(out_dir).resolve()), **job_extra)
    dev = tokenize(with_gold(dev_ds, labels).select_columns(["text", "gold"]), model_path, hyper.max_length,
                   trust_remote_code)
    log.debug("train %s: %d rows, %d workers x batch %d, %d steps/epoch, %d epochs, ZeRO-%d, loss %s", name,
             rows, hyper.num_workers, hyper.batch_size, per_epoch, hyper.epochs, hyper.zero_stage, loss)
    # Tokenize once, before training: a streamed map would re-run every epoch and compete with the
    # training workers for CPU. In input order, so a rerun's shards match its step checkpoints.
    train_ds.context.execution_options.preserve_order = True
    train_ds, dev = train_ds.materialize(), dev.materialize()
    t0 = time.time()
    with track(progress or name, per_epoch * hyper.epochs, "steps") as counter:
        job.progress = counter
        result = fit(job, train_ds, dev, run_dir=Path(run_dir), name=name, num_rows=rows,
                     scaling={"num_workers": hyper.num_workers, "use_gpu": hyper.use_gpu,
                              "resources_per_worker": dict(hyper.resources_per_worker)},
                     max_failures=default_max_failures() if hyper.max_failures is None else hyper.max_failures,
                     storage_path=storage_path)
    train_time = time.time() - t0
    if not (Path(out_dir) / "config.json").exists():
        raise RuntimeError(f"train {name}: the workers exported no model to {out_dir}")
    m = result["metrics"]  # the best checkpoint's metrics: the epoch the workers exported
    return {"dev_accuracy": m.get("dev_accuracy"),
            "dev_accuracy_per_teacher": {p: m.get(f"dev_accuracy/{p}") for p in parts},
            "best_epoch": m.get("epoch"), "global_step": result["last_metrics"].get("global_step"),
            "train_time_s": round(train_time, 2), "train_run": name}
