"""Test-only fault injection and tracing, in one place. Each hook is off unless its environment
variable is set in the driver; production runs never set them.

| variable | where | effect |
|---|---|---|
| `MUKI_FAULT_TEACHER=NAME:N[:MARKER]` | teacher actors | the actor of teacher NAME exits after N batches (once, when MARKER is a file path: the first death creates it); `NAME:N:raise` raises instead |
| `MUKI_FAULT_TRAIN_STEP=N:MARKER` | training workers | rank 0 exits once at global step N |
| `MUKI_TRACE_TRAIN_ROWS=FOLDER` | training workers | each rank appends the row ids of each step to FOLDER/rank<R>.jsonl |
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

TEACHER = "MUKI_FAULT_TEACHER"
TRAIN_STEP = "MUKI_FAULT_TRAIN_STEP"
TRACE_ROWS = "MUKI_TRACE_TRAIN_ROWS"


def teacher_env() -> dict:
    """Ray Data options that hand the teacher hook to the actors (they do not inherit the driver's
    environment); empty when it is not set."""
    return {"runtime_env": {"env_vars": {TEACHER: os.environ[TEACHER]}}} if TEACHER in os.environ else {}


def teacher_batch(name: str, batches: int) -> None:
    """Called by a teacher actor after each batch (MUKI_FAULT_TEACHER)."""
    fault = os.environ.get(TEACHER)
    if not fault:
        return
    target, n, *marker = fault.split(":", 2)
    if target != name or batches < int(n):
        return
    if marker == ["raise"]:
        raise RuntimeError(f"injected fault on batch {batches}")
    if marker:
        if os.path.exists(marker[0]):
            return
        open(marker[0], "w").close()
    os._exit(1)


def train_hooks() -> dict:
    """The training hooks read in the driver, as TrainJob fields (workers get them with the job)."""
    return {"fault_step": os.environ.get(TRAIN_STEP), "trace_rows": os.environ.get(TRACE_ROWS)}


def train_step(global_step: int, spec: Optional[str], rank: int) -> None:
    """Called by each training worker after each step (MUKI_FAULT_TRAIN_STEP)."""
    if spec:
        step, marker = spec.split(":", 1)
        if global_step == int(step) and rank == 0 and not os.path.exists(marker):
            Path(marker).write_text("failed once")
            time.sleep(3)  # let the controller register the last reported checkpoint first
            os._exit(1)


def trace_step(folder: Optional[str], rank: int, epoch: int, step: int, np_batch: dict) -> None:
    """Called by each training worker for each step (MUKI_TRACE_TRAIN_ROWS): the step's row ids."""
    if folder and "id" in np_batch:
        with open(Path(folder) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "epoch": epoch, "step": step,
                                "ids": [str(i) for i in np_batch["id"]]}) + "\n")
