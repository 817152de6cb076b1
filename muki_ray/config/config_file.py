"""A run's YAML file -> a validated `RunConfig`: read it, apply `--set` overrides, validate
(`config.parse_config`), and resolve the paths it names against the file's folder. Errors are
`ConfigError`s, one line each, naming the file or the YAML path."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from muki_ray.config.schema import ConfigError, RunConfig, Teacher, parse_config
from muki_ray.core.hf_folder import resolve_model_path


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read config: {e.__class__.__name__}: {e}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{p}:{where} invalid YAML: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{p}: the config must be a YAML mapping, got {type(raw).__name__}"])
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`a.b[1].c=value` overrides; the value is parsed as YAML (so `3`, `true`, `[a, b]` work)."""
    raw = json.loads(json.dumps(raw))
    errors = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"--set {item}: expected KEY=VALUE")
            continue
        key, value = item.split("=", 1)
        tokens = re.findall(r"([^.\[\]]+)|\[(\d+)\]", key)
        if not key or not tokens:
            errors.append(f"--set {item}: empty key")
            continue
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            parsed = value
        node: Any = raw
        path = [int(i) if i else n for n, i in tokens]
        try:
            for step, nxt in zip(path[:-1], path[1:]):
                if isinstance(step, int):
                    node = node[step]
                else:
                    if node.get(step) is None:
                        node[step] = [] if isinstance(nxt, int) else {}
                    node = node[step]
            node[path[-1]] = parsed
        except (IndexError, KeyError, TypeError, AttributeError):
            errors.append(f"--set {item}: {key} does not exist in the config")
    if errors:
        raise ConfigError(errors)
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """The YAML at `path` with `--set` overrides, validated, its relative paths resolved."""
    cfg = parse_config(apply_overrides(read_yaml(path), list(overrides)))
    resolve_paths(cfg, Path(path).resolve().parent)
    return cfg


def is_path_source(s: str) -> bool:
    """A source that names a file or folder (not a built-in dataset)."""
    from muki_ray.data.sources import BUILTIN_DATASETS  # here, not at the top: data.py loads Ray Data (start-up time)

    return s not in BUILTIN_DATASETS


def resolve_paths(cfg: RunConfig, base: Path) -> None:
    """Paths in the YAML are relative to the YAML file, except output_dir (relative to the CWD)."""

    def fix(p: Optional[str]) -> Optional[str]:
        if p is None or p.startswith("builtin:") or "://" in p or os.path.isabs(p):
            return p
        return str((base / p).resolve())

    for src in [cfg.data.pool, cfg.data.dev, cfg.data.test] + (
        [cfg.prepare.data, cfg.prepare.test] if cfg.prepare else []
    ):
        if src is not None and is_path_source(src.source):
            src.source = fix(src.source)
    for t in cfg.teachers:
        t.model = fix(t.model)
        if t.prepare is not None:
            t.prepare.model = fix(t.prepare.model)
    cfg.student.model = fix(cfg.student.model)
    cfg.student.init_from = fix(cfg.student.init_from)
    cfg.student.deepspeed_config = fix(cfg.student.deepspeed_config)
    if cfg.prepare:
        cfg.prepare.model = fix(cfg.prepare.model)


def teacher_model_path(cfg: RunConfig, teacher: Teacher) -> Path:
    """The folder a teacher is loaded from (the prepare stage's output when `model` is unset)."""
    if teacher.model is None:
        return Path(cfg.output_dir) / "prepare" / teacher.name
    return resolve_model_path(teacher.model)
