"""Connecting to Ray: an embedded local Ray by default, or a cluster at `ray.address`."""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

from muki_ray.console import ray_starting

log = logging.getLogger("muki_ray.cluster")


class ClusterError(Exception):
    """Ray cannot be reached or cannot provide what the config asks for."""


def node_resources(nodes: list[dict]) -> list[dict[str, float]]:
    """Every alive node's resources, from `ray.nodes()` entries."""
    return [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive", True)]


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
                           include_dashboard=ray_cfg.include_dashboard, dashboard_host="127.0.0.1", **quiet)
        log.info("started embedded Ray: %s%s", ray.cluster_resources(),
                 f"; dashboard http://{ctx.dashboard_url}" if ctx.dashboard_url else "")
