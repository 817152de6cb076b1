"""The run config: one YAML file describes a whole run.

Every option is defined once, here, with its default and a one-line meaning
(`Field(description=...)`). docs/config.md's schema section is generated from
these models (`muki-ray schema`). Errors are one line each and start with the
YAML path, e.g. ``teachers[1].labels: ...``.
"""

from __future__ import annotations

import math
import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from muki_ray.method.integrate import CALIBRATIONS
from muki_ray.method.strategies import SCORE_STRATEGIES, STRATEGIES

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def default(model: type[BaseModel], field: str):
    """A schema field's default: what the stage specs (TeacherSpec, ...) default to, so that every
    default is declared once, here."""
    return model.model_fields[field].get_default(call_default_factory=True)


class ConfigError(Exception):
    """One or more config errors; each line starts with its YAML path."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------- data
class Columns(Strict):
    text: str = Field("text", description="Column holding the input text.")
    label: str = Field("label", description="Column holding the label name (labeled sources only).")
    id: str = Field("id", description="Column holding a unique row id; derived from the row position when absent.")


class Source(Strict):
    source: str = Field(
        description="Built-in name (`bbc_news`, `20newsgroups`) or a path: .jsonl, .csv, .parquet, "
        "or a Hugging Face `save_to_disk` folder.")
    split: Optional[str] = Field(
        None, description="Split: `train`/`dev`/`test` for built-ins, a split name for a saved DatasetDict.")
    part: tuple[float, float] = Field(
        (0.0, 1.0),
        description="Fraction range [lo, hi): disjoint ranges give disjoint parts (e.g. teachers' texts vs the "
        "student's pool). Built-ins: a slice of a seeded, stratified order. Files: the rows whose seeded id hash "
        "falls in [lo, hi) (about that share of every label, not exactly).")
    limit: Optional[int] = Field(None, ge=1, description="At most this many rows of the part: stratified for "
                                 "built-ins, the smallest id hashes for files.")
    columns: Columns = Field(default_factory=Columns, description="Column mapping.")

    @field_validator("part")
    @classmethod
    def _part(cls, v):
        lo, hi = v
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"must satisfy 0 <= lo < hi <= 1, got [{lo}, {hi}]")
        return v


class DataConfig(Strict):
    pool: Source = Field(description="The unlabeled text pool the student learns from.")
    dev: Optional[Source] = Field(None, description="Labeled dev split: model selection only.")
    test: Optional[Source] = Field(None, description="Labeled test split: final evaluation only.")
    pool_gold_labels: bool = Field(
        False, description="The pool's label column holds gold labels. Used for analysis (supervision report), "
        "and for training only by `oracle`/`supervised`.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="Empty/non-UTF-8 text or missing columns: fail naming the row, or skip and log the count.")
    seed: int = Field(0, description="Seed of the split: the stratified order of the built-ins, the id hash of files.")
    buckets: int = Field(
        32, ge=1, le=4096, description="Hash buckets of the pool's ids. Teacher caches and the predictions join work "
        "one bucket at a time, so a task holds about pool / buckets rows; part of every teacher cache's key.")


# ----------------------------------------------------------------- teachers
class MCConfig(Strict):
    samples: int = Field(16, ge=1, description="K, the number of MC-Dropout passes.")
    dropout: Optional[float] = Field(
        None, description="Dropout p in the MC passes; default: the model's own (hidden dropout).")
    attention_dropout: bool = Field(
        False, description="Sample attention-probability dropout too (the whole model in train mode for the K "
        "passes, as the authors' code; eager attention). Off: hidden dropout only, which measured as well or "
        "better (docs/teachers.md).")
    seed: int = Field(0, description="Seed of the dropout masks (reproducible p̄).")
    max_batch_tokens: Optional[int] = Field(
        None, ge=1, description="At most this many (row x sample x token) per forward. Default by the actor's "
        "device: 2048 on CPU (about one row's K samples per forward, faster there), 65536 on GPU.")
    layers: Optional[int] = Field(
        None, ge=1, description="Cheaper estimate: run the lower layers once and sample dropout only in the top N "
        "layers and the head. Default: every layer (exact MC).")
    adaptive: bool = Field(
        False, description="Cheaper estimate: sample in rounds and stop a row once more passes cannot move its "
        "score by more than `adaptive_tolerance` (normal-approximation bound, 99%).")
    adaptive_tolerance: float = Field(0.02, gt=0, le=1, description="ε of `adaptive`, in score units (s in [0, 1]).")
    adaptive_round: int = Field(4, ge=1, description="Passes per round of `adaptive`.")

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v):
        if v is not None and not (0.0 <= v < 1.0):
            raise ValueError(f"must be in [0, 1), got {v}")
        return v


class TeacherResources(Strict):
    num_gpus: Optional[float] = Field(
        None, ge=0, description="GPUs per actor; default 1 when the cluster has GPUs, else 0.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor (fractional on small machines).")
    replicas: int = Field(1, ge=1, description="Actors in this teacher's pool.")
    threads: Optional[int] = Field(
        None, ge=1, description="torch intra-op threads per CPU actor; default: ceil(num_cpus).")
    custom: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. {accelerator_type_a100: 0.01} or "
        "a node resource that pins actors to some nodes.")
    placement_timeout_s: float = Field(
        600.0, gt=0, description="A teacher whose actors cannot be placed for this long (no node that can hold "
        "one joins), or that computes no row for this long (its node lost), fails with one line; the other "
        "teachers keep their caches.")

    @property
    def actor_threads(self) -> int:
        """`threads`, or ceil(num_cpus) when unset."""
        return self.threads or max(1, math.ceil(self.num_cpus))


class TeacherPrepare(Strict):
    """One prepared teacher's overrides of the `prepare` section (mixing base models and budgets)."""

    model: Optional[str] = Field(None, description="Base model of this teacher (default `prepare.model`).")
    epochs: Optional[int] = Field(None, ge=1, description="Its training epochs (default `prepare.epochs`).")
    lr: Optional[float] = Field(None, gt=0, description="Its peak learning rate (default `prepare.lr`).")
    texts: Optional[int] = Field(
        None, ge=1, description="Train on at most this many of `prepare.data`'s texts with its labels, picked by a "
        "seeded hash of their ids (default: all of them).")


class Teacher(Strict):
    name: str = Field(description="Unique name; prefixes this teacher's prediction columns (`NAME__probs`).")
    model: Optional[str] = Field(
        None, description="Local Hugging Face folder (or `builtin:minilm-l6`). Optional with `prepare`: "
        "defaults to `OUTPUT_DIR/prepare/NAME`.")
    labels: Optional[list[str]] = Field(
        None, description="Label names in head order; default: the model's `id2label` (generic LABEL_k refused).")
    mc: MCConfig = Field(default_factory=MCConfig, description="MC-Dropout settings.")
    batch_size: int = Field(32, ge=1, description="Rows per Ray Data batch.")
    max_length: int = Field(128, ge=2, description="Tokenizer truncation length.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype of the forward; `auto`: bf16 on GPUs with native bf16, else fp16 on "
        "GPU, fp32 on CPU. The output layer and the scores stay fp32 or wider.")
    resources: TeacherResources = Field(default_factory=TeacherResources, description="Actor resources.")
    trust_remote_code: bool = Field(False, description="Allow the model folder's own code (off: safer).")
    allow_pickle: bool = Field(False, description="Allow pickle (`.bin`) weights; safetensors otherwise.")
    prepare: Optional[TeacherPrepare] = Field(
        None, description="A prepared teacher's own settings, overriding the `prepare` section's.")

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not NAME_RE.match(v) or "__" in v:
            raise ValueError(f"{v!r} must match [A-Za-z][A-Za-z0-9_-]* without '__'")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError("duplicate label names")
        if v is not None and len(v) < 2:
            raise ValueError(f"a teacher needs at least 2 labels (its normalized MC score 1 - H/log|Y| is undefined "
                             f"for 1), got {len(v)}")
        return v


# -------------------------------------------------------------- integration
class PrototypesConfig(Strict):
    model: Optional[str] = Field(
        None, description="Encoder for the text embeddings (mean-pooled last hidden state): a local Hugging Face "
        "folder or `builtin:minilm-l6`. Default: `student.model`.")
    tau: float = Field(1.0, gt=0, description="τ of the seed weights softmax(z/τ) over teachers' standardized scores.")
    kappa: float = Field(0.05, gt=0, description="κ of the label posterior softmax(cos/κ) that scores each teacher.")
    iterations: int = Field(20, ge=0, description="Spherical k-means rounds refining the label prototypes.")
    batch_size: int = Field(64, ge=1, description="Texts per embedding batch.")
    max_length: int = Field(128, ge=2, description="Tokenizer truncation length of the embedding pass.")
    resources: TeacherResources = Field(
        default_factory=TeacherResources, description="Actors of the embedding pass (same fields as a teacher's).")


class RefineConfig(Strict):
    fraction: float = Field(0.7, gt=0, lt=1, description="Share of the pool, by widest top-2 score margin, that "
                            "the first student is trained on; it judges the rest.")
    student_weight: float = Field(0.5, ge=0, le=1, description="β: a judged text's teacher weights become "
                                  "(1 - β)·softmax(s/τ) + β·(the first student's probability mass over each teacher's "
                                  "labels).")
    rounds: int = Field(1, ge=1, description="Self-training rounds; each re-splits by the refined margin and "
                        "trains a fresh first student.")
    epochs: Optional[int] = Field(None, ge=1, description="Epochs of the first students (default `student.epochs`); "
                                  "every other training setting is the student's.")
    batch_size: int = Field(64, ge=1, description="Texts per batch when a first student judges the rest.")
    resources: TeacherResources = Field(
        default_factory=TeacherResources, description="Actors that run the first student over the rest "
        "(same fields as a teacher's).")


# The selection options a preset fills in when the YAML leaves them out. `default` is what measured
# best across the reproductions (docs/integration.md); `paper` is MUKI exactly as published.
PRESETS = {"default": {"calibration": "rank", "prototypes": {}},
           "paper": {"calibration": "none", "prototypes": None}}
SELECTION_OPTIONS = ("calibration", "prototypes", "refine")  # score-based strategies only


class IntegrationConfig(Strict):
    strategy: Literal[tuple(STRATEGIES)] = Field(  # type: ignore[valid-type]
        "muki_soft", description="How teachers become one target (one row each in `muki_ray/method/strategies.py`): "
        + "; ".join(f"`{n}`: {s.description.rstrip('.')}" for n, s in STRATEGIES.items()) + ".")
    preset: Literal[tuple(PRESETS)] = Field(  # type: ignore[valid-type]
        "default", description="Fills in `calibration` and `prototypes` when they are left out: `default` = rank "
        "calibration + label prototypes (the best measured label-free recipe); `paper` = the paper's MUKI exactly "
        "(raw MC scores, no calibration, no prototypes). Options set explicitly win over the preset.")
    temperature: float = Field(0.2, description="τ of the soft teacher weights softmax(s/τ).")
    kd_temperature: float = Field(5.0, description="T of vanilla KD over concatenated logits (loss scaled by T²).")
    reweight: bool = Field(True, description="Weight each text by the top-2 score margin m = s(1) - s(2) + 1e-6.")
    reweight_normalize: bool = Field(True, description="Scale margin weights to mean 1 over the pool.")
    target_probs: Literal["deterministic", "mc_mean"] = Field(
        "deterministic", description="Teacher distribution in the target: deterministic softmax or MC mean p̄.")
    calibration: Literal[CALIBRATIONS] = Field(  # type: ignore[valid-type]
        "rank", description="Compare teachers on pool-calibrated scores: `rank` (per-teacher quantile: as if every "
        "teacher owned an equal share of the pool), `share` (experimental: the quantiles turned into owner posteriors "
        "by a latent-class EM over the pool's embedding clusters that estimates each teacher's share, "
        "`muki_ray/method/owners.py`; needs `prototypes`; better than `rank` at shares of 25-75%, worse at 2-10% and 90-98% "
        "on BBC: docs/integration.md), `zscore` (per-teacher mean 0, std 1 over the pool) or `none` (raw, as in the paper). "
        "Default from `preset`.")
    prototypes: Optional[PrototypesConfig] = Field(
        default_factory=PrototypesConfig, description="Re-select each text's teacher by label prototypes in an "
        "embedding space (`muki_ray/method/prototypes.py`); the calibrated scores seed them. `null` turns them off. "
        "Default from `preset`.")
    refine: Optional[RefineConfig] = Field(
        None, description="Beyond the paper: confidence-thresholded self-training (`muki_ray/method/refine.py`): a first "
        "student trained on the high-margin texts re-selects the teacher of the rest. Needs `data.dev`. Off (null) "
        "by default.")
    _ignored: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _resolve(self):
        """Fill the options the YAML left out from `preset`. Non-score strategies have no
        per-teacher scores to select by: their selection options are switched off, and
        `ignored` lists the ones the YAML set, for one log line."""
        given = set(self.model_fields_set)
        # Written to __dict__: an assignment would re-run this validator (validate_assignment).
        for option, value in PRESETS[self.preset].items():
            if option not in given:
                self.__dict__[option] = PrototypesConfig(**value) if isinstance(value, dict) else value
        if self.strategy not in SCORE_STRATEGIES:
            self._ignored = [o for o in SELECTION_OPTIONS if o in given and getattr(self, o) not in (None, "none")]
            self.__dict__.update(calibration="none", prototypes=None, refine=None)
        if self.calibration == "share" and self.prototypes is None:
            raise ValueError("calibration: share estimates the teachers' shares over the prototypes' embedding "
                             "clusters; set `prototypes` (or choose calibration: rank)")
        return self

    def selection(self) -> str:
        """How this config selects among teachers, in words (validate, logs)."""
        if self.strategy not in SCORE_STRATEGIES:
            return f"none ({self.strategy} does not select by score)"
        parts = ["raw scores" if self.calibration == "none" else f"{self.calibration} calibration"]
        parts += ["label prototypes"] * (self.prototypes is not None) + ["refine"] * (self.refine is not None)
        return " + ".join(parts) + (" (the paper's MUKI)" if parts == ["raw scores"] else "")

    @property
    def ignored(self) -> list[str]:
        """Selection options set in the YAML that this (non-score) strategy ignores."""
        return list(self._ignored)

    @field_validator("temperature", "kd_temperature")
    @classmethod
    def _pos(cls, v):
        if not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v


# ------------------------------------------------------------------ student
class TrainHyper(Strict):
    """Training hyper-parameters shared by the student and prepared teachers."""

    max_length: int = Field(128, ge=2, description="Tokenizer truncation length.")
    epochs: int = Field(3, ge=1, description="Training epochs.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warmup; linear decay after.")
    batch_size: int = Field(16, ge=1, description="Micro-batch per worker.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    zero_stage: int = Field(0, description="DeepSpeed ZeRO stage, 0-3.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Training dtype; `auto`: bf16 on GPUs with native bf16, else fp32 (one line says so).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU workers use gloo.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0}, description="Ray resources per worker, e.g. {CPU: 0.5}.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer-state offload to CPU (GPU clusters).")
    deepspeed_config: Optional[str] = Field(
        None, description="A DeepSpeed JSON whose keys override the generated config (deep merge).")
    max_failures: Optional[int] = Field(
        None, ge=-1, description="Ray Train FailureConfig.max_failures (-1: unlimited); default 1 on a cluster "
        "(`ray.address` or a job's RAY_ADDRESS: one lost worker or node resumes from the last checkpoint), 0 on "
        "the embedded Ray (a crash there is a bug, rerunning it would only double the wait).")
    checkpoint_every_steps: Optional[int] = Field(
        None, ge=1, description="Also checkpoint every N optimizer steps inside an epoch; a restart resumes at "
        "the last one, skipping exactly the rows already trained (default: once per epoch).")
    seed: int = Field(0, description="Seed of model init and data order.")
    eval_resources: TeacherResources = Field(
        default_factory=TeacherResources, description="Actors that score the test set after training (same "
        "fields as a teacher's).")

    @field_validator("zero_stage")
    @classmethod
    def _zero(cls, v):
        if v not in (0, 1, 2, 3):
            raise ValueError(f"must be 0, 1, 2 or 3, got {v}")
        return v


class StudentConfig(TrainHyper):
    model: str = Field(description="Base model: local Hugging Face folder or `builtin:minilm-l6`.")
    init_from: Optional[str] = Field(
        None, description="Warm start: a previous run directory (its `student/`) or a student HF folder; the "
        "head is expanded to the new union by label name, body weights kept.")
    head_probe_rows: int = Field(
        2048, ge=0, description="Warm start only: before training, the union head is fitted on the previous "
        "student's features of this many target rows (a linear probe), so new labels start with rows as strong "
        "as the old ones (without it a warm student hardly learns its new labels); 0: old rows copied by name, "
        "new rows left at their fresh init.")
    trust_remote_code: bool = Field(False, description="Allow the model folder's own code.")
    allow_pickle: bool = Field(False, description="Allow pickle (`.bin`) weights.")


# ------------------------------------------------------------------ prepare
class PrepareConfig(TrainHyper):
    """Fine-tunes the teachers on label subsets (reproduction and demo runs)."""

    data: Source = Field(description="Labeled texts the teachers are trained on (disjoint from the pool).")
    test: Optional[Source] = Field(None, description="Labeled texts for each teacher's own-part accuracy.")
    model: str = Field(description="Base model of every teacher.")
    split: Literal["explicit", "contiguous"] = Field(
        "contiguous", description="`contiguous`: sort the labels, give teacher i the i-th contiguous slice; "
        "`explicit`: each teacher's `labels`.")


# --------------------------------------------------------------------- ray
class RayConfig(Strict):
    address: Optional[str] = Field(None, description="Ray address; absent: start an embedded local Ray.")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the embedded Ray (default: all).")
    object_store_memory: int = Field(512 * 1024**2, ge=78643200, description="Object store bytes of the embedded Ray.")
    storage_path: Optional[str] = Field(
        None, description="Ray Train checkpoint storage: a shared path or an object-store URI (s3://, gs://); "
        "default OUTPUT_DIR/ray_train.")
    include_dashboard: bool = Field(
        True, description="Start the dashboard with the embedded Ray (on 127.0.0.1); Ray Train's "
        "placement-group cleaner needs its state API.")
    autoscaling: bool = Field(
        False, description="The cluster adds nodes on demand: nothing is refused for nodes it does not have yet, "
        "and the teacher stage states its demand to the autoscaler.")


class RunConfig(Strict):
    output_dir: str = Field("runs/default", description="Run directory; every stage writes under it.")
    data: DataConfig = Field(description="Pool, dev and test sources.")
    teachers: list[Teacher] = Field(min_length=1, description="The teachers, in union-label order.")
    integration: IntegrationConfig = Field(default_factory=IntegrationConfig, description="How targets are made.")
    student: StudentConfig = Field(description="The student and its training.")
    prepare: Optional[PrepareConfig] = Field(None, description="Optional teacher fine-tuning stage.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")


# -------------------------------------------------------------- validation
def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _format_pydantic(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{_loc(loc)}: {msg}")
    return lines


def parse_config(raw: dict) -> RunConfig:
    """Validate a raw mapping: the schema, then the cross-field rules (`preflight.check_config`
    reads the folders and files it names; `config_file.load_config` reads a YAML file)."""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_pydantic(e)) from None
    errors = semantic_errors(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def semantic_errors(cfg: RunConfig) -> list[str]:
    """Cross-field checks that pydantic's per-field validation cannot express (no disk reads:
    the folders and files the config names are checked by `preflight.input_errors`)."""
    errors: list[str] = []
    seen: dict[str, int] = {}
    for i, t in enumerate(cfg.teachers):
        if t.name in seen:
            errors.append(f"teachers[{i}].name: duplicate teacher name {t.name!r} (also teachers[{seen[t.name]}])")
        seen.setdefault(t.name, i)

    if cfg.prepare is None:
        for i, t in enumerate(cfg.teachers):
            if t.model is None:
                errors.append(f"teachers[{i}].model: required field is missing (no `prepare` section)")
    elif cfg.prepare.split == "explicit":
        for i, t in enumerate(cfg.teachers):
            if not t.labels:
                errors.append(f"teachers[{i}].labels: required with prepare.split: explicit")

    for i, t in enumerate(cfg.teachers):
        if cfg.ray.autoscaling and t.resources.num_gpus is None:
            errors.append(f"teachers[{i}].resources.num_gpus: required with ray.autoscaling (its default, one GPU "
                          f"when the cluster has GPUs, cannot see GPU nodes that have not started yet, so the "
                          f"teacher would run on CPU); set 1 to wait for a GPU node, or 0 for CPU")
        if t.prepare is not None and (cfg.prepare is None or t.model is not None):
            errors.append(f"teachers[{i}].prepare: only a prepared teacher (no `model`, with a `prepare` section) "
                          f"has preparation settings")

    if cfg.integration.refine is not None and cfg.data.dev is None:
        errors.append("integration.refine: the first student picks its best epoch on a labeled dev split; "
                      "set data.dev")
    if STRATEGIES[cfg.integration.strategy].needs_gold and not cfg.data.pool_gold_labels:
        errors.append(f"integration.strategy: {cfg.integration.strategy!r} needs gold labels on the pool "
                      f"(set data.pool_gold_labels: true)")
    if cfg.prepare is not None:
        errors += _overlap_errors(cfg)
    return errors


def _overlap_errors(cfg: RunConfig) -> list[str]:
    """The paper's premise: the teachers' training texts are not in the student's pool."""
    a, b = cfg.prepare.data, cfg.data.pool
    if a.source == b.source and a.split == b.split:
        lo, hi = max(a.part[0], b.part[0]), min(a.part[1], b.part[1])
        if lo < hi and not math.isclose(lo, hi):
            return [f"prepare.data.part: overlaps data.pool.part on the same split ({a.part} vs {b.part}); "
                    f"the teachers' training texts must be disjoint from the pool"]
    return []


def prepared_settings(cfg: RunConfig, teacher: Teacher) -> PrepareConfig:
    """The `prepare` section as it applies to one prepared teacher (its own overrides on top)."""
    o = teacher.prepare
    if o is None:
        return cfg.prepare
    return cfg.prepare.model_copy(update={k: v for k, v in (("model", o.model), ("epochs", o.epochs),
                                                            ("lr", o.lr)) if v is not None})
