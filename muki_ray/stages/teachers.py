"""The teacher stage: every teacher's MC-Dropout predictions, streamed through Ray Data.

Each teacher is its own pipeline: the pool rows its cache lacks -> `map_batches(<teacher>)` on
its own actor pool -> a new part of its cache (`cache.TeacherCache`). `schedule.run_within` runs
the pipelines side by side within the cluster's free resources. Each pipeline writes:

    NAME__logits          list[float] (C,)  deterministic logits, dropout off
    NAME__probs           list[float] (C,)  softmax(logits)
    NAME__entropy         float64           H(probs), nats
    NAME__mc_probs        list[float] (C,)  p̄, mean of K dropout softmaxes
    NAME__mc_uncertainty  float64           H(p̄), nats
    NAME__mc_score        float64           s = 1 - H(p̄) / log C, in [0, 1]

Why one cache per teacher: adding a teacher to the config must cost one teacher's work, and a
teacher that fails must not lose the others' work. The predictions stage then joins the caches
bucket by bucket (`pool.join_bucket`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from muki_ray.stages.cache import TeacherCache
from muki_ray.config.schema import MCConfig, Teacher, TeacherResources, default
from muki_ray.config.config_file import teacher_model_path
from muki_ray.core import faults
from muki_ray.data.sources import hash64, io_map, io_write, list_column
from muki_ray.core.hardware import actor_device, autocast_dtype, mc_batch_tokens
from muki_ray.core.hf_folder import load_classifier, load_tokenizer
from muki_ray.core.manifest import write_json_atomic
from muki_ray.method.mc_dropout import AdaptiveK, check_sampling, mc_predict
from muki_ray.data.pool import missing_rows, over_buckets
from muki_ray.core.progress import advance
from muki_ray.stages.schedule import describe_request
from muki_ray.core.stage import COLUMNS, LIST_FIELDS, Stage, actor_resources, column, stage_class, stage_options

log = logging.getLogger("muki_ray.stages.teachers")

@dataclass(frozen=True)
class TeacherSpec:
    """Everything an actor needs to serve one teacher (plain data, cheap to ship to workers)."""

    name: str
    model_path: str
    labels: tuple[str, ...]
    samples: int = default(MCConfig, "samples")
    dropout: Optional[float] = default(MCConfig, "dropout")
    attention_dropout: bool = default(MCConfig, "attention_dropout")
    seed: int = default(MCConfig, "seed")
    max_batch_tokens: Optional[int] = default(MCConfig, "max_batch_tokens")  # None: by device
    max_length: int = default(Teacher, "max_length")
    layers: Optional[int] = default(MCConfig, "layers")   # mc.layers: sample only the top N layers
    adaptive: Optional[tuple[float, int]] = None          # mc.adaptive on: (tolerance, round)
    precision: str = default(Teacher, "precision")
    threads: int = TeacherResources().actor_threads
    trust_remote_code: bool = default(Teacher, "trust_remote_code")
    allow_pickle: bool = default(Teacher, "allow_pickle")
    progress: Optional[str] = None          # the stage's progress counter (progress.track)


class TeacherStage(Stage):
    """Ray Data stage: one teacher's MC-Dropout predictions for a batch of texts.

    `setup()` loads the model and the teacher's own tokenizer; `__call__` maps a batch
    {"id", "text": (B,), ...} to the same batch plus this teacher's columns (NAME__F for F in
    `outputs`) and `node`, without the text. Subclassed per teacher (`stage.stage_class`) so that
    Ray Data's progress shows the teacher's name.
    """

    inputs = ("id", "text")
    outputs = COLUMNS

    def setup(self) -> None:
        s = self.spec
        self.device = actor_device(s.threads)
        self.tokenizer = load_tokenizer(s.model_path, trust_remote_code=s.trust_remote_code)
        model = load_classifier(s.model_path, trust_remote_code=s.trust_remote_code, allow_pickle=s.allow_pickle)
        head = model.config.num_labels
        if head != len(s.labels):
            raise ValueError(
                f"teacher {s.name!r}: model head has {head} outputs but {len(s.labels)} labels are configured"
            )
        self.model = model.to(self.device).eval()
        probe = self.tokenizer(["probe"], return_tensors="pt")
        check_sampling(s.name, self.model, {k: v.to(self.device) for k, v in probe.items()}, s.dropout,
                       s.attention_dropout)
        self.dtype = autocast_dtype(s.precision, self.device)
        self.max_batch_tokens = s.max_batch_tokens or mc_batch_tokens(self.device)
        self.batches = 0
        self.passes = 0  # sampled forward rows (B·K without adaptive stopping)
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        out = self.predict(texts, ids=[str(i) for i in batch["id"]])
        for field in COLUMNS:
            batch[column(self.spec.name, field)] = out[field]
        batch["node"] = np.full(len(texts), self.node, dtype=object)  # where each row was computed
        del batch["text"]  # the pool keeps the text; caches and the stream carry only predictions
        self.batches += 1
        advance(self.spec.progress, len(texts), key=self.spec.name)
        faults.teacher_batch(self.spec.name, self.batches)
        return batch

    def predict(self, texts: list[str], ids: Optional[list[str]] = None) -> dict[str, np.ndarray]:
        """(B,) texts -> per-field arrays, rows in input order.

        Each row's dropout masks are seeded from (mc.seed, this teacher, its id; its text when no
        ids are given), so its p̄ does not depend on the rows it shares a batch with.

        Rows are sorted by token length and packed into micro-batches padded only to their own
        longest row, so no FLOPs go to pad tokens beyond the micro-batch maximum.
        """
        s = self.spec
        if not texts:  # an empty batch (an anti-join can leave a bucket with nothing to compute)
            c = len(s.labels)
            return {f: list_column(np.zeros((0, c), np.float32)) if f in LIST_FIELDS else np.zeros(0, np.float64)
                    for f in COLUMNS}
        enc = self.tokenizer(texts, truncation=True, max_length=s.max_length, padding=False)
        seeds = hash64([f"{s.name}\0{k}" for k in (ids if ids is not None else texts)],
                       salt=f"mc:{s.seed}:").view(np.int64)
        lengths = np.array([len(ids) for ids in enc["input_ids"]])
        order = np.argsort(-lengths, kind="stable")
        parts: list[dict[str, np.ndarray]] = []
        start = 0
        while start < len(order):
            # Longest row first, so the micro-batch width is lengths[order[start]].
            width = int(lengths[order[start]])
            rows = max(1, self.max_batch_tokens // max(1, width * s.samples))
            idx = order[start : start + rows]
            parts.append(self._forward({k: [enc[k][i] for i in idx] for k in enc.keys()}, seeds[idx]))
            start += rows
        merged = {f: np.concatenate([p[f] for p in parts]) for f in COLUMNS}
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {f: list_column(merged[f][inverse]) if f in LIST_FIELDS else merged[f][inverse] for f in COLUMNS}

    def _forward(self, features: dict[str, list], seeds: np.ndarray) -> dict[str, np.ndarray]:
        s = self.spec
        padded = self.tokenizer.pad(features, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in padded.items()}
        adaptive = AdaptiveK(tolerance=s.adaptive[0], round=s.adaptive[1]) if s.adaptive else None
        out = mc_predict(self.model, batch, samples=s.samples, dropout=s.dropout, seed=s.seed,
                         max_batch_tokens=self.max_batch_tokens, autocast_dtype=self.dtype, layers=s.layers,
                         adaptive=adaptive, row_seeds=torch.from_numpy(seeds),
                         attention_dropout=s.attention_dropout)
        self.passes += int(out.samples_used.sum())
        # Distributions as float32; entropies and the score keep float64 (MCOutput says why).
        return {f: getattr(out, f).cpu().numpy() for f in COLUMNS}


def teacher_specs(cfg, space) -> list[TeacherSpec]:
    """One TeacherSpec per configured teacher, labels from the union label space: the one place a
    teacher's config section becomes its stage's spec."""
    return [
        TeacherSpec(name=t.name, model_path=str(teacher_model_path(cfg, t)), labels=tuple(labels),
                    samples=t.mc.samples, dropout=t.mc.dropout, attention_dropout=t.mc.attention_dropout,
                    seed=t.mc.seed,
                    max_batch_tokens=t.mc.max_batch_tokens, max_length=t.max_length, precision=t.precision,
                    layers=t.mc.layers,
                    adaptive=(t.mc.adaptive_tolerance, t.mc.adaptive_round) if t.mc.adaptive else None,
                    threads=t.resources.actor_threads,
                    trust_remote_code=t.trust_remote_code, allow_pickle=t.allow_pickle)
        for t, labels in zip(cfg.teachers, space.teacher_labels)
    ]


def cache_columns(name: str) -> list[str]:
    """A teacher cache's prediction columns (besides id, text_hash, node and bucket)."""
    return [column(name, f) for f in COLUMNS]


class PlacementTimeout(RuntimeError):
    """A teacher's actors could not be placed within its `placement_timeout_s`."""


def predict_teacher(spec: TeacherSpec, teacher, cache: TeacherCache, pool_root: Path, pool_fp: str,
                    buckets: int, actors: int, gpu_default: float) -> dict:
    """One teacher's pipeline: compute the pool rows its cache lacks into a new cache part.

    Returns {"computed": rows, "busy_s": seconds}. Nothing is computed when the cache already
    covers this pool. The part is complete only once its manifest is written, so a crash leaves
    nothing that a rerun would read.
    """
    t0 = time.time()
    if cache.covers(pool_fp):
        return {"computed": 0, "busy_s": 0.0}
    # The rows no part holds yet (all of them on a first run), one bucket per task. Every task
    # of this pipeline but the actors' asks for no CPU (schedule.py says why).
    rows = over_buckets(missing_rows, buckets, io_map(), pool_root=str(pool_root), parts=cache.parts())
    options = stage_options(teacher.resources, gpu_default, actors)
    per = actor_resources(teacher.resources, gpu_default)
    # Cap this pipeline to its grant, so pools of teachers running side by side never compete.
    rows.context.execution_options.resource_limits = ray.data.ExecutionResources(
        cpu=per["CPU"] * actors, gpu=per["GPU"] * actors)
    # Its actors must be placed within the timeout: Ray Data would otherwise wait for them forever.
    timeout = teacher.resources.placement_timeout_s
    rows.context.wait_for_min_actors_s = max(1, int(round(timeout)))
    out = rows.map_batches(stage_class(spec.name, TeacherStage), fn_constructor_kwargs={"spec": spec}, batch_size=teacher.batch_size,
                           batch_format="numpy", **options, **faults.teacher_env())
    part = cache.new_part()
    # Rows arrive grouped by bucket (the anti-join yields one bucket at a time), so the bucketed
    # write makes about one file per bucket and block, with no repartition (whose tasks would need
    # a CPU that the actors hold).
    try:
        out.write_parquet(str(part / "data"), partition_cols=["bucket"], **io_write())
    except ray.exceptions.GetTimeoutError:
        raise PlacementTimeout(
            f"no actor could be placed in {timeout:g} s (teachers[].resources.placement_timeout_s): each asks for "
            f"{describe_request(per)}, which no alive node had free") from None
    except Exception as e:
        # Ray Data raises a failed pipeline's error in the context of a StopIteration from its
        # executor, whose frames hold the actors' handles: for as long as the error is kept (the
        # failure report, a caller's log), the failed teacher's actors would keep their CPUs and
        # GPUs. That context adds nothing to the error; dropped, the actors exit now.
        e.__context__ = None
        raise
    computed = sum(pq.ParquetFile(f).metadata.num_rows for f in (part / "data").rglob("*.parquet")) \
        if (part / "data").exists() else 0
    write_json_atomic(part / "manifest.json", {"rows": computed, "pool": pool_fp,
                                               "wall_time_s": round(time.time() - t0, 3)})
    cache.mark_covered(pool_fp)
    return {"computed": computed, "busy_s": round(time.time() - t0, 3)}
