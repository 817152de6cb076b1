"""Connecting to Ray: an embedded local Ray by default, or a cluster at `ray.address`."""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional
from urllib.parse import urlparse

from muki_ray.core.console import ray_starting

log = logging.getLogger("muki_ray.core.cluster")


class ClusterError(Exception):
    """Ray cannot be reached or cannot provide what the config asks for."""


def node_resources(nodes: list[dict]) -> list[dict[str, float]]:
    """Every alive node's resources, from `ray.nodes()` entries."""
    return [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive", True)]


def node_types() -> Optional[list[dict[str, float]]]:
    """The resources of each node type an autoscaler may add, from the cluster config it publishes in
    the GCS (KubeRay's autoscaler, autoscaler v2: what Ray Train and Ray Data read for the same
    purpose); None when none is published (autoscaler v1)."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # not connected, or an older GCS
        return None
    if config is None or not config.node_group_configs:
        return None
    return [{k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs if g.max_count != 0]


def cluster_nodes(autoscaling: bool) -> Optional[list[dict[str, float]]]:
    """The node shapes an actor may be placed on: the alive nodes, plus the autoscaler's node types on
    an autoscaling cluster. None when that cannot be known (an autoscaler that publishes no node types)."""
    import ray

    alive = node_resources(ray.nodes())
    if not autoscaling:
        return alive
    types = node_types()
    return None if types is None else alive + types


class Demand:
    """What a stage's actors need, stated to the autoscaler: one bundle per actor, running and
    waiting, so it adds nodes until they all fit (counting what already runs) before any actor waits.

    Stated through Ray's autoscaling coordinator, the actor through which Ray Data and Ray Train
    state their own demands: it merges every requester's bundles into the one
    `ray.autoscaler.sdk.request_resources` call the autoscaler reads, so a direct call from here would
    be overwritten by theirs at its next tick. Requests expire unless restated (`refresh_s`). Where
    Ray has no coordinator, `request_resources` itself. Call it from one thread.
    """

    expire_s = 60.0
    refresh_s = 10.0

    def __init__(self, requester: str):
        self.requester = requester
        self._client = None

    def __call__(self, bundles: list[dict[str, float]]) -> None:
        """State `bundles` (an empty list withdraws the demand)."""
        try:
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                DefaultAutoscalingCoordinator,
            )
        except ImportError:  # a Ray without the coordinator: the autoscaler's own entry point
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
            return
        if self._client is None:
            self._client = DefaultAutoscalingCoordinator(requester_id=self.requester)
        if bundles:
            self._client.request_resources(resources=bundles, expire_after_s=self.expire_s)
        else:
            self._client.cancel_request()


def refuse_oversized(requests: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> None:
    """Refuse, before any work, a request no single node can hold: Ray places an actor (a teacher's,
    a training worker) on one node, so such an actor would wait forever, whatever the cluster's
    total. `requests`: what the error names (a config field) -> one actor's resources; `nodes`:
    node_resources. The line names the field, the resource short on every node, and the largest
    node's amount of it; a field ending in `.{res}` names the resource's own key there (`num_cpus`,
    `num_gpus`, or `custom`, as in a teacher's `resources`)."""
    for where, need in requests.items():
        need = {k: float(v) for k, v in need.items() if v and v > 0}
        if any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for node in nodes):
            continue
        short = [k for k, v in need.items() if max((n.get(k, 0.0) for n in nodes), default=0.0) + 1e-9 < v]
        if short:
            res = short[0]
            most = max((n.get(res, 0.0) for n in nodes), default=0.0)
            field = where.replace(".{res}", "." + {"CPU": "num_cpus", "GPU": "num_gpus"}.get(res, "custom"))
            raise ClusterError(f"{field}: one actor asks for {need[res]:g} {res}, but no node has that much "
                               f"(the largest node has {most:g} {res})")
        raise ClusterError(f"{where.replace('.{res}', '')}: one actor asks for {_fmt(need)}, but no node has all "
                           f"of it at once "
                           f"(nodes: {'; '.join(_fmt({k: n.get(k, 0.0) for k in need}) for n in nodes)})")


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in res.items())


_joined: list[str] = []  # the cluster address `connect` joined, if any (empty: an embedded Ray)


def default_max_failures() -> int:
    """Ray Train restarts when the config sets none: 1 on a cluster (a lost worker or node resumes from
    the last checkpoint), 0 on the embedded Ray, where a crash is a bug and a retry only doubles the wait."""
    return 1 if _joined or os.environ.get("RAY_ADDRESS") else 0


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a Ray address (ray.init would otherwise retry for minutes)."""
    if address in ("auto", "local") or not address:
        return
    url = urlparse(address if "://" in address else f"gcs://{address}")
    host, port = url.hostname, url.port
    if not host or not port:
        raise ClusterError(f"ray.address: {address!r} is not host:port or ray://host:port")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(f"ray.address: no Ray cluster at {address} ({e.strerror or e})") from None


# Ray keeps at most as many idle workers as there are free CPUs, and kills the others after 1 s.
# While the teachers' actors hold every CPU of a small machine, every idle task worker is killed,
# and the stage's next tasks (the predictions join) start cold workers: a pool of 55 k rows grown
# by 10% on 2 CPUs joined in 4.3-5.3 s, 1.8-2.3 s with idle workers kept 30 s (the in-process
# join: 0.9 s). On a cluster, set it on `ray start` (RAY_idle_worker_killing_time_threshold_ms).
EMBEDDED_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 30_000}


def connect(ray_cfg) -> None:
    """ray.init once per process. Inside a Ray job (RAY_ADDRESS set) always join that cluster."""
    import ray

    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)  # a dead address is an error even when this process already runs a Ray
    _joined[:] = [address] if address else []
    if ray.is_initialized():
        return
    quiet = dict(log_to_driver=True, configure_logging=False)
    if address:
        try:
            with ray_starting():
                ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"ray.address: no Ray cluster at {address} ({str(e).splitlines()[0]})") from None
        log.info("connected to Ray at %s: %s", address, ray.cluster_resources())
    else:
        with ray_starting():
            ctx = ray.init(num_cpus=ray_cfg.num_cpus, object_store_memory=ray_cfg.object_store_memory,
                           include_dashboard=ray_cfg.include_dashboard, dashboard_host="127.0.0.1",
                           _system_config=EMBEDDED_SYSTEM_CONFIG, **quiet)
        log.info("started embedded Ray: %s%s", ray.cluster_resources(),
                 f"; dashboard http://{ctx.dashboard_url}" if ctx.dashboard_url else "")
