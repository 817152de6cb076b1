"""The teacher stage: every teacher's MC-Dropout predictions, streamed through Ray Data.

One actor pool per teacher, chained with `map_batches` (never `zip`: zip materializes its
inputs and does not keep block order). Each stage appends that teacher's columns:

    NAME__logits          list[float] (C,)  deterministic logits, dropout off
    NAME__probs           list[float] (C,)  softmax(logits)
    NAME__entropy         float             H(probs), nats
    NAME__mc_probs        list[float] (C,)  p̄, mean of K dropout softmaxes
    NAME__mc_uncertainty  float             H(p̄), nats
    NAME__mc_score        float             s = 1 - H(p̄) / log C, in [0, 1]

Why one cache per teacher: adding a teacher to the config must cost one teacher's work. Each
teacher's columns are therefore also stored alone, keyed by `id` under a fingerprint of its model,
labels and MC settings; a reused teacher enters the chain as a cheap lookup stage instead of a
model (see `CachedTeacher`), so the chain's output has the same columns either way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from muki_ray.data import list_column
from muki_ray.mc_dropout import AdaptiveK, mc_predict

FAULT_ENV = "MUKI_FAULT_TEACHER"
log = logging.getLogger("muki_ray.teachers")

COLUMNS = ("logits", "probs", "entropy", "mc_probs", "mc_uncertainty", "mc_score")


def column(teacher: str, field: str) -> str:
    return f"{teacher}__{field}"


@dataclass(frozen=True)
class TeacherSpec:
    """Everything an actor needs to serve one teacher (plain data, cheap to ship to workers)."""

    name: str
    model_path: str
    labels: tuple[str, ...]
    samples: int = 16
    dropout: Optional[float] = None
    seed: int = 0
    max_batch_tokens: Optional[int] = None  # None: by device (hardware.mc_batch_tokens)
    max_length: int = 128
    layers: Optional[int] = None            # mc.layers: sample only the top N layers
    adaptive: Optional[tuple[float, int]] = None  # mc.adaptive: (tolerance, round)
    precision: str = "fp32"
    threads: int = 1
    trust_remote_code: bool = False
    allow_pickle: bool = False


class TeacherStage:
    """Ray Data callable class: one teacher's MC-Dropout predictions for a batch of texts.

    `setup()` loads the model and the teacher's own tokenizer; `__call__` maps a batch
    {"text": (B,), ...} to the same batch plus this teacher's columns. Subclassed per teacher
    (see `stage_class`) so that Ray Data's progress shows the teacher's name.
    """

    def __init__(self, spec: TeacherSpec):
        self.spec = spec
        self.model = None
        self.setup()

    def setup(self) -> None:
        from muki_ray.hardware import actor_device, autocast_dtype, mc_batch_tokens
        from muki_ray.hf_folder import load_classifier, load_tokenizer

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
        self.dtype = autocast_dtype(s.precision, self.device)
        self.max_batch_tokens = s.max_batch_tokens or mc_batch_tokens(self.device)
        self.batches = 0
        self.passes = 0  # sampled forward rows (B·K without adaptive stopping)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        out = self.predict(texts)
        for field in COLUMNS:
            batch[column(self.spec.name, field)] = out[field]
        self.batches += 1
        _maybe_fail(self.spec.name, self.batches)
        return batch

    def predict(self, texts: list[str]) -> dict[str, np.ndarray]:
        """(B,) texts -> per-field arrays, rows in input order.

        Rows are sorted by token length and packed into micro-batches padded only to their own
        longest row, so no FLOPs go to pad tokens beyond the micro-batch maximum.
        """
        s = self.spec
        enc = self.tokenizer(texts, truncation=True, max_length=s.max_length, padding=False)
        lengths = np.array([len(ids) for ids in enc["input_ids"]])
        order = np.argsort(-lengths, kind="stable")
        parts: list[dict[str, np.ndarray]] = []
        start = 0
        while start < len(order):
            # Longest row first, so the micro-batch width is lengths[order[start]].
            width = int(lengths[order[start]])
            rows = max(1, self.max_batch_tokens // max(1, width * s.samples))
            idx = order[start : start + rows]
            parts.append(self._forward({k: [enc[k][i] for i in idx] for k in enc.keys()}))
            start += rows
        merged = {f: np.concatenate([p[f] for p in parts]) for f in COLUMNS}
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {f: list_column(merged[f][inverse]) for f in COLUMNS}

    def _forward(self, features: dict[str, list]) -> dict[str, np.ndarray]:
        s = self.spec
        padded = self.tokenizer.pad(features, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in padded.items()}
        adaptive = AdaptiveK(tolerance=s.adaptive[0], round=s.adaptive[1]) if s.adaptive else None
        out = mc_predict(self.model, batch, samples=s.samples, dropout=s.dropout, seed=s.seed,
                         max_batch_tokens=self.max_batch_tokens, autocast_dtype=self.dtype, layers=s.layers,
                         adaptive=adaptive)
        self.passes += int(out.samples_used.sum())
        return {f: getattr(out, f).float().cpu().numpy() for f in COLUMNS}


def _maybe_fail(name: str, batches: int) -> None:
    """Test-only fault hook: MUKI_FAULT_TEACHER=NAME:N[:MARKER] kills this actor after N batches
    (only once when MARKER is given: the first death creates that file)."""
    fault = os.environ.get(FAULT_ENV)
    if not fault:
        return
    target, n, *marker = fault.split(":", 2)
    if target != name or batches < int(n):
        return
    if marker:
        if os.path.exists(marker[0]):
            return
        open(marker[0], "w").close()
    os._exit(1)


def _fault_hook_env() -> dict:
    """Actors do not inherit the driver's environment: hand them the test-only fault hook."""
    return {"runtime_env": {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}}} if FAULT_ENV in os.environ else {}


class CachedTeacher:
    """Ray Data callable class: append a reused teacher's columns from its cache, joined by `id`.

    Stands in the chain where the model would, so the chain's output has the same columns
    whether a teacher was computed now or reused.
    """

    def __init__(self, name: str, cache_dir: str):
        import pyarrow.parquet as pq

        self.name = name
        table = pq.read_table(cache_dir)
        self.row = {rid: i for i, rid in enumerate(table.column("id").to_pylist())}
        self.columns = {f: table.column(column(name, f)).to_numpy(zero_copy_only=False) for f in COLUMNS}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            idx = np.array([self.row[rid] for rid in batch["id"]], dtype=np.int64)
        except KeyError as e:
            raise RuntimeError(f"teacher {self.name!r}: cached predictions lack pool id {e.args[0]!r}") from None
        for f, values in self.columns.items():
            picked = values[idx]
            batch[column(self.name, f)] = list_column(np.stack(picked)) if picked.dtype == object else picked
        return batch


def teacher_fingerprint(spec: TeacherSpec, pool_fingerprint: str) -> str:
    """What a teacher's predictions depend on: model content, labels, MC settings, length, pool."""
    from muki_ray.manifest import fingerprint, folder_fingerprint

    settings = {k: v for k, v in spec.__dict__.items() if k not in ("name", "model_path", "threads")}
    return fingerprint([folder_fingerprint(spec.model_path), settings, pool_fingerprint])


def stage_class(name: str, base: type = TeacherStage) -> type:
    """A subclass named after the teacher: Ray Data labels a stage with its class name."""
    return type(name, (base,), {"__module__": base.__module__, "__qualname__": name})


def stage_options(resources, num_gpus_default: float) -> dict:
    """map_batches options for one teacher's actor pool, from its `resources` config."""
    import ray.data

    num_gpus = resources.num_gpus if resources.num_gpus is not None else num_gpus_default
    return {
        "compute": ray.data.ActorPoolStrategy(size=resources.replicas),
        "num_cpus": resources.num_cpus,
        "num_gpus": num_gpus,
        # No max_restarts/max_task_retries here: Ray Data's actor pools already default both to
        # -1, so a lost actor is restarted and its batch retried and the stream completes.
    }


def teacher_specs(cfg, space) -> list[TeacherSpec]:
    """One TeacherSpec per configured teacher, labels from the union label space."""
    from muki_ray.config import teacher_model_path

    return [
        TeacherSpec(name=t.name, model_path=str(teacher_model_path(cfg, t)), labels=tuple(labels),
                    samples=t.mc.samples, dropout=t.mc.dropout, seed=t.mc.seed,
                    max_batch_tokens=t.mc.max_batch_tokens, max_length=t.max_length, precision=t.precision,
                    layers=t.mc.layers,
                    adaptive=(t.mc.adaptive_tolerance, t.mc.adaptive_round) if t.mc.adaptive else None,
                    threads=t.resources.actor_threads,
                    trust_remote_code=t.trust_remote_code, allow_pickle=t.allow_pickle)
        for t, labels in zip(cfg.teachers, space.teacher_labels)
    ]


def chain_teachers(ds, cfg, specs: list[TeacherSpec], cached: Optional[dict[str, str]] = None):
    """pool dataset {id, text} -> the same rows plus every teacher's columns, one actor pool each.

    `cached` maps teacher name -> cache folder: that teacher is joined from its cache instead.
    """
    import ray.data

    from muki_ray.hardware import cluster_has_gpus

    cached = cached or {}
    gpu_default = 1.0 if cluster_has_gpus() else 0.0
    by_name = {t.name: t for t in cfg.teachers}
    for spec in specs:
        t = by_name[spec.name]
        if spec.name in cached:
            ds = ds.map_batches(stage_class(f"{spec.name}_cached", CachedTeacher),
                                fn_constructor_kwargs={"name": spec.name, "cache_dir": cached[spec.name]},
                                batch_size=t.batch_size, batch_format="numpy", num_cpus=0.1,
                                compute=ray.data.ActorPoolStrategy(size=1))
            continue
        ds = ds.map_batches(stage_class(spec.name), fn_constructor_kwargs={"spec": spec},
                            batch_size=t.batch_size, batch_format="numpy",
                            **stage_options(t.resources, gpu_default), **_fault_hook_env())
    return ds
