"""Running the teachers' pipelines side by side, within the cluster's free resources.

Each teacher is an independent Ray Data pipeline (read -> its actor pool -> write its cache). The
scheduler starts as many as the free resources hold, one grant of k actors each (k <= replicas),
and starts the next teacher as one finishes. It never needs all N actor pools alive at once.

Why no interleaving can hang:
1. Pipelines are independent. A teacher's actors read only its own input and feed only its own
   write, so no pipeline ever waits for another one's output (the chained design did: idle pools
   of later teachers held every CPU while an earlier teacher waited for one).
2. Inside a pipeline only the actors hold resources. Reads, checks and writes ask for no CPU
   (`data.io_map`), so they are never queued behind actors: the read starvation of
   ray#44687 cannot happen, and an actor always gets its input.
3. Grants add up to at most the cluster's capacity for us: the free resources seen at the start,
   plus what joined since (minus what left), re-read whenever a pipeline ends and every few
   seconds while one waits. Each pipeline is capped to its grant (Ray Data `resource_limits`,
   a pool of exactly the granted actors), so actor pools cannot grow into each other's share.
   Hence every started pipeline has all its actors, makes progress, finishes, and returns its
   grant. A waiting teacher waits only for pipelines that finish or for nodes that join; when
   none of ours is running it is started anyway, and Ray queues its one actor until the cluster
   has room (on an autoscaling cluster, the demand this module states makes that room).
4. A changing cluster adds no wait of ours: a joining node only adds capacity; a leaving node
   only stops new starts until running pipelines return their grants (Ray Data restarts the
   actors it held on whichever node can take them). A request that no node can hold is refused
   before the stage (`cluster.refuse_oversized`), so a started actor always fits some node.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from muki_ray.core.cluster import ClusterError

log = logging.getLogger("muki_ray.stages.schedule")


@dataclass(frozen=True)
class Job:
    """One teacher's pipeline: `run(actors)` runs it with that many actors and returns its result."""

    name: str
    per_actor: dict[str, float]   # Ray resources of one actor, e.g. {"CPU": 1.0, "GPU": 1.0}
    replicas: int
    run: Callable[[int], Any]
    progress: Optional[Callable[[], Optional[int]]] = None  # work done so far (None: cannot be read now)
    stall_s: Optional[float] = None  # fail the job when `progress` holds still this long
    stall_hint: str = ""             # what the failure line adds: the setting, what an actor asks for


class Stalled(RuntimeError):
    """A job made no progress for its `stall_s`: its actors could not be placed, or lost their node."""


class TeacherFailed(Exception):
    """Some teacher pipelines failed; the others finished and kept their caches."""

    def __init__(self, failures: dict[str, BaseException]):
        self.failures = failures
        first = next(iter(failures))
        why = str(failures[first]).strip().splitlines()
        super().__init__(f"teacher {first!r} failed: {why[0] if why else type(failures[first]).__name__}"
                         + (f" (and {', '.join(map(repr, list(failures)[1:]))})" if len(failures) > 1 else "")
                         + "; the other teachers' caches are kept, a rerun computes only the missing ones")


def actors_that_fit(job: Job, budget: dict[str, float]) -> int:
    """How many of the job's actors (at most `replicas`) the budget holds now."""
    k = job.replicas
    for res, need in job.per_actor.items():
        if need > 0:
            k = min(k, int(math.floor(budget.get(res, 0.0) / need + 1e-9)))
    return max(k, 0)


def settled_free(read: Callable[[], dict], total: dict, timeout_s: float = 10.0, interval_s: float = 0.25,
                 stable_s: float = 2.0) -> dict[str, float]:
    """The free resources once work that just ended has handed its share back.

    Ray's view of free resources lags: just after a stage's last tasks finish, it can still show
    their CPUs in use, and a snapshot taken then would start half the teachers that fit (measured:
    2 teachers on 2 CPUs ran one after the other). Polls `read` (ray.available_resources) until
    it shows every CPU and GPU of `total` free, or the same CPUs and GPUs for `stable_s` (another
    job holds them), or `timeout_s` passes.
    """
    def key(r):
        return tuple(round(r.get(k, 0.0), 6) for k in ("CPU", "GPU"))

    start = since = time.time()
    last = read()
    while time.time() - start < timeout_s and any(last.get(k, 0.0) < total.get(k, 0.0) - 1e-9 for k in ("CPU", "GPU")):
        time.sleep(interval_s)
        now = read()
        if key(now) != key(last):
            since = time.time()
        last = now
        if time.time() - since >= stable_s:
            break
    return last


def run_within(jobs: list[Job], free: dict[str, float], *, total: Callable[[], dict] | None = None,
               demand: Callable[[list[dict]], None] | None = None, poll_s: float = 2.0,
               say_every_s: float = 30.0, stage: str = "predict") -> tuple[dict[str, Any], dict[str, dict]]:
    """Run every job, at most what the cluster holds at once; returns (results, timeline).

    free: the free resources when the stage starts (`settled_free`).
    total: reads the cluster's resources now (`ray.cluster_resources`); re-read at least every
        `poll_s` while a job waits, and whenever a job ends, so nodes that join are used as they
        join, and nodes that leave stop new starts. None: a fixed cluster.
    demand: states what the jobs need, running and waiting, as one bundle per actor
        (`cluster.Demand`), so that an autoscaler adds the nodes before any actor waits; restated
        every `demand.refresh_s`, withdrawn (an empty list) when the stage ends. While a job waits,
        one line every `say_every_s` says for what (`stage` names the stage in that line).
    timeline[name] = {start, end, actors} in seconds since the call. Raises TeacherFailed, after
    every other job has finished, when a job raised.
    """
    base = total() if total is not None else {}

    def capacity() -> dict[str, float]:
        """The free resources at the start, plus what joined the cluster since (minus what left)."""
        now = total() if total is not None else base
        return {k: float(free.get(k, 0.0)) + now.get(k, 0.0) - base.get(k, 0.0) for k in {*free, *now, *base}}

    pending, running = list(jobs), {}
    results, failures, timeline = {}, {}, {}
    t0, said, stated, sent = time.time(), -math.inf, None, 0.0
    # Daemon threads, not an executor: a stalled job is given up, and its thread (blocked in Ray Data,
    # waiting for actors that cannot be placed) must not keep the process alive at exit.
    finished: queue.Queue = queue.Queue()

    def launch(job: Job, k: int) -> None:
        def body():
            try:
                finished.put((job.name, None, job.run(k)))
            except Exception as e:  # a failing teacher ends the stage, after the others finish
                finished.put((job.name, e, None))

        threading.Thread(target=body, name=f"teacher {job.name}", daemon=True).start()

    def end(name: str, error: Optional[BaseException], result: Any) -> None:
        running.pop(name)
        timeline[name]["end"] = round(time.time() - t0, 3)
        if error is None:
            results[name] = result
            return
        failures[name] = error
        log.error("teacher %s failed: %s", name, str(error).strip().splitlines()[0] if str(error) else error)

    try:
        while pending or running:
            budget = capacity()
            for job, grant, _ in running.values():
                for res, v in grant.items():
                    budget[res] = budget.get(res, 0.0) - v
            for job in list(pending):
                k = actors_that_fit(job, budget)
                if k == 0 and not running:
                    k = 1  # nothing of ours holds resources: Ray queues this actor until some are free
                if k == 0:
                    continue  # a smaller teacher may still fit
                grant = {res: need * k for res, need in job.per_actor.items()}
                for res, v in grant.items():
                    budget[res] = budget.get(res, 0.0) - v
                pending.remove(job)
                timeline[job.name] = {"start": round(time.time() - t0, 3), "actors": k}
                log.debug("teacher %s: started with %d actor(s)", job.name, k)
                running[job.name] = (job, grant, [None, time.time()])  # last progress seen, and since when
                launch(job, k)
            if demand is not None:
                bundles = [bundle(job.per_actor) for job, _, _ in running.values()
                           for _ in range(timeline[job.name]["actors"])]
                bundles += [bundle(job.per_actor) for job in pending for _ in range(job.replicas)]
                if bundles != stated or time.time() - sent >= getattr(demand, "refresh_s", math.inf):
                    demand(bundles)
                    stated, sent = bundles, time.time()
                if pending and time.time() - said >= say_every_s:
                    said = time.time()
                    log.info("%s: waiting for %s (teacher%s %s)", stage, waiting_for(pending, budget),
                             "s" if len(pending) > 1 else "", ", ".join(j.name for j in pending))
            watched = any(job.stall_s for job, _, _ in running.values())
            try:
                items = [finished.get(timeout=poll_s if (pending and total is not None) or watched else None)]
            except queue.Empty:
                items = []
            while not finished.empty():
                items.append(finished.get_nowait())
            for item in items:
                end(*item)
            for name, (job, _, seen) in list(running.items()):
                if job.progress is None or not job.stall_s:
                    continue
                now = job.progress()
                # A counter that cannot be read shows no progress: were it lost for good, the job would
                # otherwise be watched forever (a run never waits forever; a brief miss is far below stall_s).
                if now is not None and now != seen[0]:
                    seen[:] = [now, time.time()]
                elif time.time() - seen[1] >= job.stall_s:
                    end(name, Stalled(f"no row computed for {job.stall_s:g} s{job.stall_hint}"), None)
    finally:
        if demand is not None and stated:
            demand([])  # the stage is over: the autoscaler may remove the nodes it added for it
    if failures:
        raise TeacherFailed(failures)
    return results, timeline


def bundle(per_actor: dict[str, float]) -> dict[str, float]:
    """One actor's resources as an autoscaler bundle (the resources it asks for, none at 0)."""
    return {k: float(v) for k, v in per_actor.items() if v and v > 0}


def describe_request(per_actor: dict[str, float]) -> str:
    """One actor's request as a console phrase: `1 GPU, 4 CPU`."""
    return ", ".join(f"{v:g} {k}" for k, v in bundle(per_actor).items())


def waiting_for(pending: list[Job], budget: dict[str, float]) -> str:
    """What the waiting jobs' first actors lack in all: `2 teacher_slot, 1 GPU`."""
    short: dict[str, float] = {}
    for job in pending:
        for res, need in bundle(job.per_actor).items():
            if budget.get(res, 0.0) + 1e-9 < need:
                short[res] = short.get(res, 0.0) + need
    return ", ".join(f"{v:g} {k}" for k, v in short.items()) or "running teachers to finish"
