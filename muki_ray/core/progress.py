"""Progress of a long stage: its workers add to a counter; the driver shows done/total and an ETA.

The driver opens `track(label, total, unit)` around the stage. That starts a named actor with no
resources (a counter) and yields its name; the stage passes the name to its workers, which call
`advance(name, n)` after each batch or step (fire and forget: a lost update only slows the bar).
On a terminal the driver draws a tqdm bar; otherwise (CI, `ray job logs`) it logs one line at most
every `every_s` seconds, and none for a stage shorter than that.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import uuid
from typing import Iterator, Optional

import ray
import ray.util.scheduling_strategies

log = logging.getLogger("muki_ray.core.progress")
NOT_A_TERMINAL_EVERY_S = 30.0
_handles: dict = {}


@ray.remote(num_cpus=0)
class Counter:
    def __init__(self):
        self.n = 0
        self.by_key: dict[str, int] = {}

    def add(self, n: int, key: Optional[str] = None) -> None:
        self.n += n
        if key is not None:
            self.by_key[key] = self.by_key.get(key, 0) + n

    def get(self, key: Optional[str] = None) -> int:
        return self.n if key is None else self.by_key.get(key, 0)


def advance(name: Optional[str], n: int = 1, key: Optional[str] = None) -> None:
    """Add `n` to the stage counter `name` (None: no counter, nothing to do), and to its count of
    `key` (a teacher's name: the scheduler watches each teacher's own progress)."""
    if not name:
        return
    handle = _handles.get(name)
    if handle is None:
        try:
            handle = _handles[name] = ray.get_actor(name)
        except ValueError:  # the stage ended and killed it: nothing left to show
            return
    handle.add.remote(n, key)


def counted(name: str, key: str, timeout_s: float = 10.0) -> Optional[int]:
    """What `key` has added to the stage counter `name` so far (None when the counter cannot be read)."""
    try:
        return int(ray.get(ray.get_actor(name).get.remote(key), timeout=timeout_s))
    except Exception:  # a slow or ended counter never stops the stage
        return None


def eta(done: int, total: int, elapsed_s: float) -> Optional[float]:
    """Seconds left at the rate so far (None before anything is done)."""
    return elapsed_s * (total - done) / done if done > 0 else None


def describe(label: str, done: int, total: int, unit: str, elapsed_s: float) -> str:
    """`label: 120/300 rows (40%), 1m12s elapsed, ETA 1m48s`."""
    left = eta(done, total, elapsed_s)
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    return (f"{label}: {done}/{total} {unit}{pct}, {_clock(elapsed_s)} elapsed"
            + (f", ETA {_clock(left)}" if left is not None else ""))


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@contextlib.contextmanager
def track(label: str, total: int, unit: str = "rows", every_s: float = NOT_A_TERMINAL_EVERY_S,
          terminal: Optional[bool] = None) -> Iterator[str]:
    """Show a stage's progress while the block runs; yields the counter's name for its workers."""
    name = f"muki-progress-{uuid.uuid4().hex[:12]}"
    # On the driver's node: a counter on a worker node would be lost with that node, and the scheduler
    # reads each teacher's progress from it to tell a stalled teacher from a running one. Hard affinity:
    # a soft one was seen to place it on a worker node (the lost-node test), and a 0-CPU actor always
    # fits the driver's node, which lives as long as the driver.
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                         soft=False)
    counter = Counter.options(name=name, scheduling_strategy=here).remote()
    terminal = sys.stderr.isatty() if terminal is None else terminal
    stop, t0 = threading.Event(), time.time()
    bar = None
    if terminal:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit=f" {unit}", file=sys.stderr, leave=False, dynamic_ncols=True)

    def poll() -> int:
        try:
            return int(ray.get(counter.get.remote(), timeout=10))
        except Exception:  # a slow or lost counter never stops the stage
            return -1

    def show() -> None:
        last = t0
        while not stop.wait(0.5 if terminal else 1.0):
            n = poll()
            if n < 0:
                continue
            if bar is not None:
                bar.update(min(n, total) - bar.n)
            elif time.time() - last >= every_s:
                last = time.time()
                log.info(describe(label, n, total, unit, last - t0))

    thread = threading.Thread(target=show, daemon=True, name=f"progress {label}")
    thread.start()
    try:
        yield name
    finally:
        stop.set()
        thread.join(timeout=15)
        if bar is not None:
            bar.close()
        _handles.pop(name, None)
        ray.kill(counter)
