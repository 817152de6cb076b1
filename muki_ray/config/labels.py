"""The labels: each teacher's label names (from the config, the model's id2label or the paper's
split rule) and the union label space Y = Y_1 ∪ ... ∪ Y_N over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from muki_ray.config.schema import RunConfig
from muki_ray.config.config_file import teacher_model_path
from muki_ray.core.hf_folder import head_labels, read_hf_config


@dataclass(frozen=True)
class LabelSpace:
    """Union of teacher label lists, in teacher order (first occurrence wins).

    `positions[i]` (C_i,) int64 maps teacher i's local label j to its union index;
    a name shared by several teachers is one union label owned by all of them.
    """

    teachers: tuple[str, ...]
    teacher_labels: tuple[tuple[str, ...], ...]
    names: tuple[str, ...] = field(init=False)
    index: dict[str, int] = field(init=False)
    positions: tuple[np.ndarray, ...] = field(init=False)
    owners: dict[str, tuple[str, ...]] = field(init=False)

    def __post_init__(self):
        if len(self.teachers) != len(self.teacher_labels):
            raise ValueError("one label list per teacher is needed")
        names: list[str] = []
        index: dict[str, int] = {}
        owners: dict[str, list[str]] = {}
        for teacher, labels in zip(self.teachers, self.teacher_labels):
            for name in labels:
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
                owners.setdefault(name, []).append(teacher)
        positions = tuple(np.array([index[n] for n in labels], dtype=np.int64) for labels in self.teacher_labels)
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "owners", {k: tuple(v) for k, v in owners.items()})

    @classmethod
    def from_teachers(cls, teachers: dict[str, list[str]]) -> "LabelSpace":
        return cls(tuple(teachers), tuple(tuple(v) for v in teachers.values()))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def overlapping(self) -> tuple[str, ...]:
        """Union labels owned by more than one teacher."""
        return tuple(n for n in self.names if len(self.owners[n]) > 1)

    def owner_mask(self) -> np.ndarray:
        """(N, |Y|) bool: teacher i owns union label y."""
        mask = np.zeros((len(self.teachers), len(self.names)), dtype=bool)
        for i, pos in enumerate(self.positions):
            mask[i, pos] = True
        return mask

    def encode(self, labels, missing: int = -1) -> np.ndarray:
        """Label names -> union indices (B,); unknown or None -> `missing`."""
        return np.array([self.index.get(x, missing) if x is not None else missing for x in labels], dtype=np.int64)

    def describe(self) -> str:
        """Human summary: each union label with its owner(s), overlaps marked."""
        width = max(len(n) for n in self.names) if self.names else 0
        lines = [f"union label space: {len(self.names)} labels from {len(self.teachers)} teachers"]
        for i, name in enumerate(self.names):
            own = self.owners[name]
            mark = "  (overlap)" if len(own) > 1 else ""
            lines.append(f"  {i:>3}  {name:<{width}}  <- {', '.join(own)}{mark}")
        return "\n".join(lines)


def contiguous_split(labels: list[str], n: int) -> list[list[str]]:
    """The paper's rule: sort the labels, teacher i gets the i-th contiguous slice."""
    ordered = sorted(labels)
    size, extra = divmod(len(ordered), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(ordered[start:end])
        start = end
    return out



def teacher_labels(cfg: RunConfig, all_prepare_labels: Optional[list[str]] = None) -> list[list[str]]:
    """Each teacher's label names, in head order.

    With `prepare.split: contiguous`, `all_prepare_labels` (the labeled data's label set) is sliced
    by the paper's rule; otherwise labels come from the config or the model's id2label.
    """
    out = []
    slices = None
    if cfg.prepare is not None and cfg.prepare.split == "contiguous":
        if all_prepare_labels is None:
            raise ValueError("teacher_labels: prepare.split=contiguous needs the labeled data's label set")
        slices = contiguous_split(all_prepare_labels, len(cfg.teachers))
    for i, t in enumerate(cfg.teachers):
        if slices is not None and t.model is None:
            out.append(t.labels or slices[i])
        elif t.labels is not None:
            out.append(list(t.labels))
        else:
            _, names = head_labels(read_hf_config(teacher_model_path(cfg, t)))
            out.append(list(names or []))
    return out


def label_space(cfg: RunConfig) -> LabelSpace:
    """The union label space of a validated config (reads the prepare data's labels if needed)."""
    prepare_labels = None
    if cfg.prepare is not None and cfg.prepare.split == "contiguous":
        # Here, not at the top: Ray (Data) loads only when a config needs the data's label set (start-up time).
        from muki_ray.data.sources import BUILTIN_DATASETS, builtin_part, scan_source

        src = cfg.prepare.data
        if src.source in BUILTIN_DATASETS:  # a bounded built-in: its labels are read here
            labels = builtin_part(src.source, src.split, src.part, src.limit, cfg.data.seed).column("label").to_pylist()
        else:  # a user's file is scanned by Ray Data
            from muki_ray.core.cluster import connect

            connect(cfg.ray)
            labels = scan_source(src, on_bad_row=cfg.data.on_bad_row, seed=cfg.data.seed, require_label=True).labels
        prepare_labels = sorted(set(labels))
    lists = teacher_labels(cfg, prepare_labels)
    return LabelSpace.from_teachers({t.name: labels for t, labels in zip(cfg.teachers, lists)})
