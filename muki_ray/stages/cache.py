"""What decides whether work is redone: each stage's key, each teacher cache's key and layout.

`run` skips a stage whose manifest records the same key and inputs; `diff` compares two configs'
keys without running anything. Both read only this module, so they always agree.

A teacher's cache is keyed by what its predictions depend on (model, labels, MC settings,
length, precision, buckets), not by the pool: its rows are keyed by (id, text hash), so a pool
that grows computes only its new or changed rows (an anti-join on the cache), and every cached
row stays valid for any pool that holds the same text under the same id.

    RUN_DIR/cache/teachers/NAME-KEY/parts/PART/data/bucket=B/*.parquet   {id, text_hash, node, NAME__*}
    RUN_DIR/cache/teachers/NAME-KEY/parts/PART/manifest.json        written last: a part is complete
    RUN_DIR/cache/teachers/NAME-KEY/coverage.json                   pool fingerprints fully covered
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from muki_ray.config.schema import RunConfig
from muki_ray.config.config_file import teacher_model_path
from muki_ray.data.sources import source_signature
from muki_ray.core.hf_folder import resolve_model_path
from muki_ray.config.labels import LabelSpace
from muki_ray.core.manifest import MANIFEST, fingerprint, folder_fingerprint, read_manifest, write_json_atomic

CACHE_VERSION = 4  # 2: bucketed parts keyed by (id, text_hash); 3: float64 entropies and scores; 4: 16-bit mask lanes
STAGES = ("pool", "prepare", "predictions", "targets", "train", "evaluate", "report")


# ------------------------------------------------------------------ teacher caches
def teacher_settings(cfg: RunConfig, space: LabelSpace, i: int) -> dict:
    """Everything but the model that a teacher's predictions depend on."""
    t = cfg.teachers[i]
    # An option left off is left out, so caches from before it existed stay valid.
    mc = t.mc.model_dump(exclude={"attention_dropout"} if not t.mc.attention_dropout else None)
    return {"labels": list(space.teacher_labels[i]), "mc": mc, "max_length": t.max_length,
            "precision": t.precision, "buckets": cfg.data.buckets, "version": CACHE_VERSION}


def teacher_key(cfg: RunConfig, space: LabelSpace, i: int) -> str:
    """The cache key of teacher i. A prepared teacher is named by the prepare stage that makes it
    (its config key and, once it ran, its output id), so `diff` can key it before it exists."""
    t = cfg.teachers[i]
    if cfg.prepare is not None and t.model is None:
        done = read_manifest(Path(cfg.output_dir) / "prepare")
        model = ["prepare", config_key(cfg, space, "prepare"), t.name, done and done["output_id"]]
    else:
        path = teacher_model_path(cfg, t)
        model = folder_fingerprint(path) if path.exists() else "missing"
    return fingerprint([model, teacher_settings(cfg, space, i)])


@dataclass(frozen=True)
class TeacherCache:
    """One teacher's cache folder (see the module docstring)."""

    root: Path

    @classmethod
    def of(cls, cfg: RunConfig, space: LabelSpace, i: int) -> "TeacherCache":
        name = cfg.teachers[i].name
        return cls(Path(cfg.output_dir) / "cache" / "teachers" / f"{name}-{teacher_key(cfg, space, i)}")

    def parts(self) -> list[str]:
        """The bucketed data folders of the complete parts (a part's manifest is written last, so a
        crashed part is never read)."""
        d = self.root / "parts"
        return sorted(str(p / "data") for p in d.iterdir() if (p / MANIFEST).exists()) if d.is_dir() else []

    def covers(self, pool_fp: str) -> bool:
        return pool_fp in (read_manifest(self.root, "coverage.json") or {}).get("pools", [])

    def new_part(self) -> Path:
        """A fresh part folder; incomplete parts of earlier crashes are removed first."""
        d = self.root / "parts"
        if d.is_dir():
            for p in d.iterdir():
                if not (p / MANIFEST).exists():
                    shutil.rmtree(p, ignore_errors=True)
        part = d / uuid.uuid4().hex[:12]
        part.mkdir(parents=True)
        return part

    def mark_covered(self, pool_fp: str) -> None:
        pools = (read_manifest(self.root, "coverage.json") or {}).get("pools", [])
        write_json_atomic(self.root / "coverage.json", {"pools": sorted(set(pools) | {pool_fp})})


# ------------------------------------------------------------------ stage keys
# How training survives failures never changes what it produces.
RESTARTS = {"max_failures", "checkpoint_every_steps"}


def pool_settings(cfg: RunConfig) -> list:
    """What the pool stage's output depends on besides the source's content."""
    d = cfg.data
    return [d.pool.model_dump(), d.seed, d.on_bad_row, d.pool_gold_labels, d.buckets]


def config_key(cfg: RunConfig, space: LabelSpace, stage: str) -> str:
    """The config part of a stage's key: what `diff` compares and `run` records."""
    d = cfg.data
    dev = d.dev.model_dump() if d.dev else None
    if stage == "pool":
        return fingerprint(pool_settings(cfg) + [source_signature(d.pool)])
    if stage == "prepare":
        own = {t.name: t.prepare.model_dump() for t in cfg.teachers if t.prepare is not None}
        return fingerprint([cfg.prepare.model_dump() if cfg.prepare else None, space.teacher_labels, space.teachers,
                            dev, d.seed] + ([own] if own else []))  # left out when unused: older runs stay cached
    if stage == "predictions":
        return fingerprint([[t.name, teacher_key(cfg, space, i)] for i, t in enumerate(cfg.teachers)])
    if stage == "targets":
        integ = cfg.integration
        # Options left off are left out of the key, so runs from before they existed stay cached;
        # resources and batch sizes never change a result.
        # `preset` only fills the options below in, so it is left out too.
        exclude = {"preset": True, **({"calibration": True} if integ.calibration == "none" else {})}
        exclude["prototypes"] = True if integ.prototypes is None else {"resources"}
        exclude["refine"] = True if integ.refine is None else {"resources", "batch_size"}
        key = [integ.model_dump(exclude=exclude)]
        if integ.prototypes is not None:
            key.append(folder_fingerprint(prototypes_model(cfg)))
        if integ.refine is not None:  # the first students are trained like the student, on data.dev
            key += [cfg.student.model_dump(exclude={"init_from", *RESTARTS}), dev]
        return fingerprint([key, list(space.names)] if len(key) > 1 else [key[0], list(space.names)])
    if stage == "train":
        return fingerprint([cfg.student.model_dump(exclude=RESTARTS), cfg.integration.strategy, cfg.integration.kd_temperature,
                            space.names, dev])
    if stage == "evaluate":
        return fingerprint(d.test.model_dump() if d.test else None)
    raise ValueError(stage)


UPSTREAM = {"predictions": "pool", "targets": "predictions", "train": "targets", "evaluate": "train"}


def stage_keys(cfg: RunConfig, space: LabelSpace, run_dir: Path, stage: str) -> tuple[str, dict]:
    """(config key, upstream inputs) that decide whether `stage` must rerun in RUN_DIR."""
    up = UPSTREAM.get(stage)
    if up is None:
        return config_key(cfg, space, stage), {}
    m = read_manifest(Path(run_dir) / up)
    if m is None:
        raise FileNotFoundError(f"{Path(run_dir) / up}: stage {up!r} has not completed")
    # The pool is named by its content, so a rewritten but identical pool reruns nothing.
    return config_key(cfg, space, stage), {up: m["fingerprint"] if up == "pool" else m["output_id"]}


def prototypes_model(cfg: RunConfig) -> Path:
    """The encoder of `integration.prototypes` (default: the student's base model)."""
    return resolve_model_path(cfg.integration.prototypes.model or cfg.student.model)


# ------------------------------------------------------------------ diff
def plan_changes(a: RunConfig, space_a: LabelSpace, b: RunConfig, space_b: LabelSpace) -> list[str]:
    """What running config B after config A recomputes, stage by stage and teacher by teacher."""
    lines, rerun = [], False
    for stage in STAGES[:-1]:
        if stage == "prepare" and b.prepare is None:
            continue
        changed = config_key(a, space_a, stage) != config_key(b, space_b, stage) or \
            (stage == "prepare" and a.prepare is None)
        if stage == "predictions":
            lines.append(_predictions_plan(a, space_a, b, space_b, rerun))
            rerun = rerun or changed
            if space_a.names != space_b.names:
                grown = [n for n in space_b.names if n not in space_a.names]
                gone = [n for n in space_a.names if n not in space_b.names]
                lines.append(f"union labels: {len(space_a)} -> {len(space_b)}"
                             + (f" (+{', '.join(grown)})" if grown else "") + (f" (-{', '.join(gone)})" if gone else ""))
            continue
        if stage == "prepare":  # prepare has no upstream; the pool does not feed it
            lines.append(f"prepare: {'rerun (prepare section, teacher labels or dev changed)' if changed else 'reuse'}")
            continue
        why = "its section changed" if changed else "an upstream stage reruns"
        rerun = rerun or changed
        lines.append(f"{stage}: {'rerun (' + why + ')' if rerun else 'reuse'}")
    return lines


def _predictions_plan(a, space_a, b, space_b, pool_reruns: bool) -> str:
    ka = {t.name: teacher_key(a, space_a, i) for i, t in enumerate(a.teachers)}
    kb = {t.name: teacher_key(b, space_b, i) for i, t in enumerate(b.teachers)}
    computed = {n: ("new" if n not in ka else "changed") for n in kb if ka.get(n) != kb[n]}
    reused = [n for n in kb if n not in computed]
    removed = [n for n in ka if n not in kb]
    detail = "; ".join(filter(None, [
        "compute " + ", ".join(f"{n} ({why})" for n, why in computed.items()) if computed else "",
        ("compute the new pool rows of " if pool_reruns else "reuse ") + ", ".join(reused) if reused else "",
        "drop " + ", ".join(removed) if removed else ""]))
    rerun = bool(computed or removed or pool_reruns)
    return f"predictions: {'rerun' if rerun else 'reuse'} - {detail}"
