"""The Ray Data stage idiom, in one place (after NeMo Curator's stages).

A stage is a plain class built from a spec (plain data, cheap to ship to actors): `setup()` loads
its model once per actor, `__call__(batch) -> batch` maps a numpy batch, and `inputs` / `outputs`
declare the columns it reads and adds. A thin adapter makes it a Ray Data stage:
`stage_class` names it (Ray Data's progress shows the name) and `stage_options` gives the
`map_batches` options of its actor pool from a config's `resources` section. The teachers, the
embedding, the evaluation and the refine judge are stages.

The predictions' column contract lives here too: teacher NAME's field F is the column NAME__F,
with F in `COLUMNS` (the teacher stage's outputs; teachers.py's docstring gives their types).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import ray.data

COLUMNS = ("logits", "probs", "entropy", "mc_probs", "mc_uncertainty", "mc_score")
LIST_FIELDS = ("logits", "probs", "mc_probs")  # (C,) float32 per row; the others are float64 scalars


def column(teacher: str, field: str) -> str:
    """The predictions column of one teacher's field."""
    return f"{teacher}__{field}"


class Stage:
    """Base of every Ray Data stage: `spec` in, `setup()` once per actor, `__call__` per batch."""

    inputs: tuple[str, ...] = ("text",)
    outputs: tuple[str, ...] = ()

    def __init__(self, spec):
        self.spec = spec
        self.setup()

    def setup(self) -> None:
        """Load the model and whatever else one actor keeps between batches."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def stage_class(name: str, base: type) -> type:
    """A subclass of the stage `base` named `name`: Ray Data labels a stage with its class name."""
    return type(name, (base,), {"__module__": base.__module__, "__qualname__": name})


def actor_resources(resources, num_gpus_default: float) -> dict[str, float]:
    """Ray resources of one actor of a stage, from its `resources` config."""
    num_gpus = resources.num_gpus if resources.num_gpus is not None else num_gpus_default
    return {"CPU": resources.num_cpus, "GPU": num_gpus, **resources.custom}


def stage_options(resources, num_gpus_default: float, actors: Optional[int] = None) -> dict:
    """map_batches options for one actor pool, from its `resources`: exactly `actors` actors when
    given (a scheduler's grant, all of it used), else 1 to `replicas` actors."""
    per = actor_resources(resources, num_gpus_default)
    return {
        "compute": ray.data.ActorPoolStrategy(size=actors) if actors
        else ray.data.ActorPoolStrategy(min_size=1, max_size=resources.replicas),
        "num_cpus": per["CPU"], "num_gpus": per["GPU"],
        **({"resources": dict(resources.custom)} if resources.custom else {}),
        # No max_restarts/max_task_retries here: Ray Data's actor pools already default both to
        # -1, so a lost actor is restarted and its batch retried and the stream completes.
    }
