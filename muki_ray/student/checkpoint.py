"""The student's state on disk: the model built (partitioned under ZeRO-3, warm-started from a
previous student), Ray Train checkpoints, and the exported `from_pretrained` folder.

Runs inside the training workers; the driver never builds the model or reads a checkpoint.
`job` is a student.TrainJob (plain data shipped to every worker).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import tempfile
import time
from pathlib import Path

from muki_ray.core.hf_folder import (head_keys, label_names, load_classifier, load_tokenizer, save_atomic,
                                save_shards_atomic, weight_format, weight_reader)

log = logging.getLogger("muki_ray.student.training")
EXPORT_MAX_PARAMETERS = 10**8  # ZeRO-3 export group without stage3_max_live_parameters in the config


def append_log(job, rec: dict) -> None:
    """One line of train_log.jsonl (rank 0), tagged with the Ray Train run it belongs to."""
    if job.log_path:
        with open(job.log_path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "run": job.run_name, **rec}) + "\n")


def save_checkpoint(engine, state: dict, metrics: dict) -> None:
    """Every rank saves its DeepSpeed shard (with `state`: where to resume, the best epoch so far); Ray
    Train merges them into one checkpoint. The reported metrics carry the best epoch's as `best/...`,
    so the driver reads them from the last report."""
    import ray.train  # here and below: only the training workers load Ray Train, DeepSpeed and torch

    best = {f"best/{k}": v for k, v in state["best"]["metrics"].items()}
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="state", client_state=state)
        ray.train.report({**metrics, **best}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def build_model(job, rank: int = 0, dtype=None):
    """The classifier over the union labels, and the handle that keeps ZeRO-3's partitioned
    creation on (None below stage 3). Under ZeRO-3 transformers creates every parameter inside
    `deepspeed.zero.Init`, so a rank never holds more than its shard plus one layer being loaded."""
    names = list(job.labels)
    zero3 = job.ds_config.get("zero_optimization", {}).get("stage") == 3
    # Before ZeRO-3 is switched on: the skeletons must stay on the meta device, not be partitioned.
    heads = head_keys(job.model_path, len(names), trust_remote_code=job.trust_remote_code) \
        if job.init_from or zero3 else set()
    rename = {}
    if zero3 and weight_format(Path(job.model_path)) == "safetensors":
        # transformers' ZeRO-3 loading ignores ignore_mismatched_sizes: a base head sized for another
        # label count is renamed away, so it is skipped and the union head is created fresh.
        with weight_reader(job.model_path) as w:
            rename = {rf"^{re.escape(k)}$": f"discarded_head.{k}" for k in heads
                      if k in w and w[k].get_shape()[0] != len(names)}
    partitioned = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        partitioned = HfDeepSpeedConfig(job.ds_config)
    model = load_classifier(job.model_path, trust_remote_code=job.trust_remote_code, allow_pickle=job.allow_pickle,
                            num_labels=len(names), id2label=dict(enumerate(names)),
                            label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True,
                            **({"dtype": dtype} if dtype is not None else {}),
                            **({"key_mapping": rename} if rename else {}))
    if job.init_from:
        _warm_start(model, job, rank, heads)
    return model, partitioned


def _warm_start(model, job, rank: int, heads: set[str]) -> None:
    """Copy a previous student (`job.init_from`) into the new model: body tensors of the same name and
    shape; head tensors (`heads`, first dim = label count) row by row by label name, so rows of new
    labels keep their fresh init, unless `job.init_head` holds the probed union head (all its rows
    fitted before training: head_probe.py). Tensors are read one at a time; a ZeRO-3 parameter is gathered to
    rank 0, written there and re-partitioned, so no rank ever holds the whole model."""
    import deepspeed  # inside the worker (start-up time): the driver imports this module without them
    import torch
    from safetensors.torch import load_file

    old_labels = label_names(job.init_from)
    rows = {j: old_labels.index(n) for j, n in enumerate(job.labels) if n in old_labels}
    copied = []
    # The probed union head (warm_start.probe_warm_head): the head tensors only, read whole.
    probed = {} if job.init_head is None else load_file(job.init_head)
    with weight_reader(job.init_from) as old, torch.no_grad():
        for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
            if name not in old and name not in probed:
                continue
            sharded = hasattr(p, "ds_id")
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0) if sharded else contextlib.nullcontext():
                if sharded and rank != 0:
                    continue
                if name in probed:  # the probed union head: every row, already in union order
                    p.data.copy_(probed[name].to(p.dtype))
                    copied.append(name)
                    continue
                t = old[name][:]
                if name in heads:
                    for j, i in rows.items():
                        p.data[j] = t[i].to(p.dtype)
                elif tuple(t.shape) == tuple(p.shape):
                    p.data.copy_(t.to(p.dtype))
                else:
                    continue
                copied.append(name)
    if rank == 0:
        kept = [job.labels[j] for j in rows]
        log.info("warm start from %s: %d tensors copied; head rows copied by name: %s; new: %s", job.init_from,
                 len(copied), ", ".join(kept), ", ".join(n for n in job.labels if n not in old_labels) or "none")
        append_log(job, {"event": "warm_start", "from": job.init_from, "tensors": len(copied),
                         "head": sorted(heads), "probed_head": sorted(probed), "copied_labels": kept,
                         "new_labels": [n for n in job.labels if n not in old_labels]})


def local_parameters(model) -> tuple[int, int]:
    """(parameters held by this rank, parameters of the model): ZeRO-3's `ds_tensor` shards and
    `ds_numel` sizes, or every parameter when the model is not partitioned."""
    local = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        local += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else n
    return local, total


def save_student(engine, job, rank: int) -> None:
    """Write the `from_pretrained` folder (union id2label, the base model's tokenizer) to job.out_dir
    from the workers. Below ZeRO-3 rank 0's module holds every weight and saves it. Under ZeRO-3
    every rank takes part in gathering the 16-bit weights group by group (`_zero3_shards`), and
    rank 0 writes each group as one safetensors shard before the next is gathered, so no rank ever
    holds the whole model. Rank 0 writes to a temporary name, then renames."""
    if not job.out_dir:  # the same on every rank: no rank enters the gather alone
        return
    tokenizer = load_tokenizer(job.model_path, trust_remote_code=job.trust_remote_code) if rank == 0 else None
    if job.ds_config.get("zero_optimization", {}).get("stage") == 3:
        # Evaluation leaves prefetched parameters in flight; wait for and release them before gathering.
        engine.empty_partition_cache()
        # At most as many parameters gathered at a time as training keeps live (stage3_max_live_parameters).
        limit = job.ds_config["zero_optimization"].get("stage3_max_live_parameters", EXPORT_MAX_PARAMETERS)
        shards = _zero3_shards(engine.module, rank, int(limit))
        if rank == 0:
            save_shards_atomic(engine.module.config, tokenizer, job.out_dir, shards)
        else:
            for _ in shards:  # the gathers are collective: every rank walks the same groups
                pass
    elif rank == 0:
        save_atomic(engine.module, tokenizer, job.out_dir)


def _zero3_shards(module, rank: int, max_params: int):
    """{name: CPU tensor} groups of at most `max_params` parameters (one tensor may exceed it), in
    state-dict order: each group's ZeRO-3 parameters are gathered on every rank, copied to CPU on
    rank 0 (empty dicts elsewhere) and released before the next group. Persistent buffers are added
    to the groups as they are; a tied parameter is written once, under its first name."""
    import deepspeed  # inside the worker, as in student.train_loop_per_worker (start-up time)

    keys = set(module.state_dict().keys())
    tensors = [(n, p) for n, p in module.named_parameters() if n in keys]
    tensors += [(n, b) for n, b in module.named_buffers() if n in keys]
    for group in _groups(tensors, max_params):
        sharded = [t for _, t in group if hasattr(t, "ds_id")]
        with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
            yield {k: t.detach().to("cpu", copy=True).contiguous() for k, t in group} if rank == 0 else {}


def _groups(tensors: list, max_params: int):
    """Consecutive runs of (name, tensor) of at most `max_params` elements each (ZeRO-3's full
    `ds_numel`, not the local partition); a tensor larger than that is a group of its own."""
    group, size = [], 0
    for name, t in tensors:
        n = int(getattr(t, "ds_numel", t.numel()))
        if group and size + n > max_params:
            yield group
            group, size = [], 0
        group.append((name, t))
        size += n
    if group:
        yield group


def student_folder(init_from: str) -> Path:
    """A run directory's `student/`, or the folder itself."""
    src = Path(init_from)
    return src / "student" if (src / "student" / "config.json").exists() else src


def growth(init_from: str, space) -> dict:
    """What a warm-started student grows from: the previous student's labels (old) and the rest
    of the union (new), the teachers whose labels are all old, the others (new), and the previous
    run's test figures when its metrics.json is beside its student folder (before the growth)."""
    src = student_folder(init_from)
    old = set(label_names(src))
    previous = src.parent / "metrics.json"
    before = json.loads(previous.read_text()) if previous.exists() else {}
    return {"from": str(src.resolve()), "old_labels": [n for n in space.names if n in old],
            "new_labels": [n for n in space.names if n not in old],
            "old_teachers": [t for t, labels in zip(space.teachers, space.teacher_labels) if set(labels) <= old],
            "new_teachers": [t for t, labels in zip(space.teachers, space.teacher_labels) if not set(labels) <= old],
            "before": {k: before[k] for k in ("test_accuracy", "test_accuracy_per_teacher") if k in before}}


def warm_start_folder(init_from: str, labels) -> str:
    """The student folder to warm-start from (`student_folder`); logs which labels keep their
    trained head rows. The workers copy the weights (`_warm_start`)."""
    src = student_folder(init_from)
    old = label_names(src)
    dropped = [n for n in old if n not in set(labels)]
    if dropped:
        log.warning("warm start: labels no longer in the union are dropped: %s", ", ".join(dropped))
    log.debug("warm start from %s: %d of %d labels keep their head rows, %d new", src,
             sum(n in old for n in labels), len(labels), sum(n not in old for n in labels))
    return str(src.resolve())
