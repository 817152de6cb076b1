"""The union label space Y = Y_1 ∪ ... ∪ Y_N over the teachers' label names."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
