"""The config-schema table of docs/config.md, generated from the pydantic models in schema.py (one source
of truth: `muki-ray schema --update docs/config.md` rewrites it, and a test checks it is current)."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from muki_ray.config.schema import RunConfig


def schema_markdown() -> str:
    """docs/config.md's schema section, generated from the models above (one source of truth)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    documented: dict[type, str] = {}

    def walk(model: type[BaseModel], prefix: str):
        for name, f in model.model_fields.items():
            ann = f.annotation
            sub = _submodel(ann)
            key = f"{prefix}{name}"
            default = "required" if f.is_required() else (
                "-" if f.default_factory is not None and sub else repr(f.get_default(call_default_factory=True))
            )
            tname = "section" if sub else _type_name(ann)
            if sub and _is_list(ann):
                tname, key_sub = "list", f"{key}[]."
            else:
                key_sub = f"{key}."
            if sub in documented:  # a repeated section type (e.g. a data source) is documented once
                tname = f"section, as `{documented[sub]}`"
            lines.append(f"| `{key}` | {tname} | {default} | {f.description or ''} |")
            if sub and sub not in documented:
                documented[sub] = key
                walk(sub, key_sub)

    walk(RunConfig, "")
    return "\n".join(lines)


def _submodel(ann):
    for a in (ann, *typing.get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        for b in typing.get_args(a):
            if isinstance(b, type) and issubclass(b, BaseModel):
                return b
    return None


def _is_list(ann) -> bool:
    return typing.get_origin(ann) is list


def _type_name(ann) -> str:
    s = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return s.replace("|", "\\|")
