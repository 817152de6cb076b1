"""Check every input before any work: data, model folders, the output directory, the cluster.

A bad input fails here, in seconds, with one line naming the field, file or row, before Ray
starts and before anything is written, instead of hours later in the middle of a stage.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from muki_ray.core.cluster import ClusterError, refuse_oversized
from muki_ray.config.schema import ConfigError, RunConfig, Source, prepared_settings
from muki_ray.config.config_file import is_path_source, load_config, teacher_model_path
from muki_ray.core.hf_folder import (ModelLoadError, check_folder, head_labels, load_tokenizer, model_skeleton,
                                read_hf_config, resolve_model_path, weight_format)
from muki_ray.config.labels import LabelSpace

MIN_FREE_BYTES = 1024**3  # a student checkpoint (weights + optimizer state) plus predictions


class OutputError(Exception):
    """The output directory cannot take the run's files."""


GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


def load_checked(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """`config_file.load_config`, then `check_config`: what every command that runs work loads."""
    return check_config(load_config(path, overrides))


def check_config(cfg: RunConfig) -> RunConfig:
    """The folders and files a valid config names: one ConfigError listing every problem."""
    errors = input_errors(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def model_folders(cfg: RunConfig) -> list[tuple[str, str, bool, bool]]:
    """Every model the config names that exists before the run (a prepared teacher's does not yet):
    (YAML path, folder or `builtin:NAME`, allow_pickle, trust_remote_code)."""
    s, protos = cfg.student, cfg.integration.prototypes
    out = [(f"teachers[{i}].model", t.model, t.allow_pickle, t.trust_remote_code)
           for i, t in enumerate(cfg.teachers) if t.model is not None]
    out += [(f"teachers[{i}].prepare.model", t.prepare.model, False, False)
            for i, t in enumerate(cfg.teachers) if t.prepare is not None and t.prepare.model]
    out.append(("student.model", s.model, s.allow_pickle, s.trust_remote_code))
    out += [("prepare.model", cfg.prepare.model, False, False)] if cfg.prepare else []
    out += [("integration.prototypes.model", protos.model, False, False)] if protos and protos.model else []
    return out


def input_errors(cfg: RunConfig) -> list[str]:
    """One line per problem with the folders and files the config names, each starting with its
    YAML path: model folders (config.json, the head against `labels`, `mc.layers` against the
    depth), `student.deepspeed_config`, and data files that do not exist."""
    errors: list[str] = []
    hf_configs = {}
    for where, model, _, _ in model_folders(cfg):
        try:
            hf_configs[where] = read_hf_config(resolve_model_path(model))
        except ValueError as e:
            errors.append(f"{where}: {e}")
    for i, t in enumerate(cfg.teachers):
        hf = hf_configs.get(f"teachers[{i}].model")
        if hf is None:  # prepared (its folder does not exist yet), or unreadable (said above)
            continue
        size, names = head_labels(hf)
        if t.labels is None:
            if names is None or any(GENERIC_LABEL.match(n) for n in names):
                errors.append(
                    f"teachers[{i}].labels: the model's id2label has generic LABEL_k names; list the labels explicitly"
                )
            elif size < 2:
                errors.append(f"teachers[{i}].labels: a teacher needs at least 2 labels, the model head has {size}")
        elif len(t.labels) != size:
            errors.append(f"teachers[{i}].labels: {len(t.labels)} labels given but the model head has {size} outputs")
        depth = hf.get("num_hidden_layers", hf.get("n_layers"))
        if t.mc.layers is not None and depth is not None and t.mc.layers > depth:
            errors.append(f"teachers[{i}].mc.layers: {t.mc.layers} but the model has {depth} layers")
    if cfg.student.deepspeed_config and not Path(cfg.student.deepspeed_config).is_file():
        errors.append(f"student.deepspeed_config: file {cfg.student.deepspeed_config} not found")
    for where, src in sources(cfg):
        if is_path_source(src.source) and "://" not in src.source and not Path(src.source).exists():
            errors.append(f"{where}.source: {src.source} does not exist")
    return errors


def sources(cfg: RunConfig) -> list[tuple[str, Source]]:
    """Every data source the config names, with its YAML path."""
    out = [("data.pool", cfg.data.pool)]
    if cfg.data.dev:
        out.append(("data.dev", cfg.data.dev))
    if cfg.data.test:
        out.append(("data.test", cfg.data.test))
    if cfg.prepare:
        out.append(("prepare.data", cfg.prepare.data))
        if cfg.prepare.test:
            out.append(("prepare.test", cfg.prepare.test))
    return out


def check_data(cfg: RunConfig, space: LabelSpace) -> None:
    """Scan every labeled source with Ray Data (every row checked, labels in the union except
    prepare.data's); raise DataError.

    The pool is checked by its own stage, the first one to run.
    """
    from muki_ray.data.sources import check_labels, scan_source  # here, not at the top: Ray Data (start-up time)

    for where, src in sources(cfg):
        if where != "data.pool":
            info = scan_source(src, on_bad_row=cfg.data.on_bad_row, seed=cfg.data.seed, require_label=True)
            if where != "prepare.data":  # its texts of labels no teacher owns are skipped by prepare, counted
                check_labels(info, space.names, where)


def check_models(cfg: RunConfig) -> None:
    """Every model folder: config.json, weights in an allowed format, a loadable tokenizer, readable weights."""
    import torch  # here, not at the top: `validate` reads folders without loading torch (start-up time)

    from muki_ray.method.mc_dropout import check_sampling  # imports torch
    for where, model, allow_pickle, remote in model_folders(cfg):
        check_model_folder(where, resolve_model_path(model), allow_pickle, remote)
    for i, t in enumerate(cfg.teachers):  # a prepared teacher has the structure of its base model
        folder = teacher_model_path(cfg, t) if t.model is not None else \
            resolve_model_path(prepared_settings(cfg, t).model)
        probe = {"input_ids": torch.ones(1, 4, dtype=torch.long, device="meta")}  # meta: no weights, no FLOPs
        try:
            check_sampling(t.name, model_skeleton(folder, trust_remote_code=t.trust_remote_code), probe, t.mc.dropout,
                           t.mc.attention_dropout)
        except ValueError as e:
            raise ModelLoadError(f"teachers[{i}].mc: {e}") from None
        except Exception:  # noqa: BLE001  an architecture whose forward needs real values: its actor checks it
            pass


def check_model_folder(where: str, folder: Path, allow_pickle: bool, trust_remote_code: bool) -> None:
    try:
        check_folder(folder, allow_pickle)
        load_tokenizer(folder, trust_remote_code=trust_remote_code)
        if weight_format(folder) == "safetensors":
            _read_safetensors_headers(folder)
    except ModelLoadError as e:
        raise ModelLoadError(f"{where}: {e}") from None


def _read_safetensors_headers(folder: Path) -> None:
    """Open each weights file's header (cheap: no tensor is read)."""
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"{f}: weights failed to load: {str(e).splitlines()[0]}") from None


def check_output_dir(path: Path, min_free: int = MIN_FREE_BYTES) -> None:
    """The output directory (or its nearest existing parent) is writable and has room; nothing is left behind."""
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"output_dir: {probe_dir} is not a directory")
    probe = probe_dir / f".muki-write-test-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"x")
    except OSError as e:
        raise OutputError(f"output_dir: cannot write to {probe_dir} ({e.strerror})") from None
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(probe_dir).free
    if free < min_free:
        raise OutputError(f"output_dir: only {free / 1024**2:.0f} MiB free on {probe_dir}; a run needs at least "
                          f"{min_free / 1024**3:.1f} GiB")


def check_resources(cfg: RunConfig, total: dict, nodes: Optional[list[dict]] = None) -> None:
    """Refuse, before any work, requests the cluster can never meet (Ray would wait forever): GPUs
    on a cluster that has and can get none, and one actor or training worker that no single node can
    hold. `nodes`: cluster.cluster_nodes (the alive nodes, plus an autoscaler's node types); None
    when an autoscaler publishes no node types, where both checks step aside (nodes may join)."""
    if nodes is None:
        return
    if total.get("GPU", 0) == 0 and not any(n.get("GPU", 0) > 0 for n in nodes):
        check_no_gpus_asked(cfg)
    check_node_fit(cfg, nodes)


def check_no_gpus_asked(cfg: RunConfig) -> None:
    """On a cluster without GPUs, no stage may ask for one."""
    asks = [(f"teachers[{i}].resources.num_gpus", t.resources.num_gpus) for i, t in enumerate(cfg.teachers)
            if t.resources.num_gpus]
    if cfg.student.use_gpu:
        asks.append(("student.use_gpu", cfg.student.num_workers))
    if cfg.prepare is not None and cfg.prepare.use_gpu:
        asks.append(("prepare.use_gpu", cfg.prepare.num_workers))
    if asks:
        where, n = asks[0]
        raise ClusterError(f"{where}: asks for {n:g} GPU(s) but the Ray cluster has none; set it to 0/false, or "
                           f"run on a cluster with GPU nodes (ray.autoscaling: true if they are added on demand)")


def check_node_fit(cfg: RunConfig, nodes: list[dict]) -> None:
    """Every actor pool's actor (teachers, evaluation, embedding, refine) and every training worker
    (student, prepare) against the largest node."""
    requests = {}

    def actor(where: str, r) -> None:
        requests[f"{where}.{{res}}"] = {"CPU": r.num_cpus, "GPU": r.num_gpus or 0.0, **r.custom}

    for i, t in enumerate(cfg.teachers):
        actor(f"teachers[{i}].resources", t.resources)
    integ = cfg.integration
    if integ.prototypes is not None:
        actor("integration.prototypes.resources", integ.prototypes.resources)
    if integ.refine is not None:
        actor("integration.refine.resources", integ.refine.resources)
    for name, hyper in (("student", cfg.student), ("prepare", cfg.prepare)):
        if hyper is not None:
            requests[f"{name}.resources_per_worker"] = {**(dict(hyper.resources_per_worker) or {"CPU": 1.0}),
                                                        **({"GPU": 1.0} if hyper.use_gpu else {})}
            actor(f"{name}.eval_resources", hyper.eval_resources)
    refuse_oversized(requests, nodes)
