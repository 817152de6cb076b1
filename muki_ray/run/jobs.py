"""Running the pipeline as a Ray job: join the job's cluster, check shared storage, then the CLI."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import ray

from muki_ray.run.cli import EXIT_BAD_INPUT, main
from muki_ray.core.cluster import ClusterError, check_address
from muki_ray.config.schema import ConfigError
from muki_ray.config.config_file import load_config
from muki_ray.core.console import capture_native_output, configure

SHARED_PREFIXES = ("/mnt/cluster_storage", "/mnt/shared", "/mnt/efs", "/mnt/nfs")


def storage_problem(output_dir: str, alive_nodes: int, shared_prefixes=SHARED_PREFIXES) -> str | None:
    """Why `output_dir` cannot hold a run on this cluster, or None.

    On more than one node, every stage's outputs must be visible to every node (teacher actors
    and training workers write and read them), so a node-local path is refused.
    """
    if alive_nodes <= 1:
        return None
    p = str(Path(output_dir).resolve()) if "://" not in output_dir else output_dir
    if "://" in p:
        return (f"output_dir: {output_dir} is an object-store URI; the run directory must be a shared "
                f"filesystem path (e.g. /mnt/cluster_storage/...) mounted on every node")
    if not p.startswith(tuple(shared_prefixes)):
        return (f"output_dir: {output_dir} is a node-local path on a {alive_nodes}-node cluster; use shared "
                f"storage mounted on every node ({', '.join(shared_prefixes)}), or add your mount to "
                f"MUKI_SHARED_STORAGE")
    return None


def job_output_dir(output_dir: str, roots, is_dir=os.path.isdir) -> tuple[str | None, str]:
    """A job's relative output_dir, resolved against the first shared storage root mounted here, or
    refused (None) when none is: inside a job the working directory is a temporary copy of the
    repo on one node, which vanishes with the job. Returns (the path or None, the line saying which)."""
    root = next((r for r in roots if is_dir(r)), None)
    if root is None:
        return None, (f"output_dir: {output_dir} is relative, which inside a job is the job's temporary "
                      f"working-dir copy; use an absolute path on shared storage ({', '.join(roots)}), "
                      f"or set MUKI_SHARED_STORAGE to your mount")
    path = str(Path(root) / output_dir)
    return path, f"output_dir: {output_dir} is relative; resolved against the shared storage root: {path}"


def job_main(command: str, argv: list[str]) -> int:
    """`python jobs/<entry>.py --config CONFIG [--set k=v ...]` -> `muki-ray <command> CONFIG ...`."""
    configure(verbose=False)  # before ray.init below: Ray's start-up lines go to the run log too
    capture_native_output()
    ap = argparse.ArgumentParser(prog=f"jobs/{command.replace('-', '_')}.py")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--force", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        for line in e.errors:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    extra = tuple(p for p in os.environ.get("MUKI_SHARED_STORAGE", "").split(":") if p)
    if not os.path.isabs(cfg.output_dir) and "://" not in cfg.output_dir:
        resolved, line = job_output_dir(cfg.output_dir, extra + SHARED_PREFIXES)
        print(line, file=sys.stderr)
        if resolved is None:
            return EXIT_BAD_INPUT
        args.set.append(f"output_dir={resolved}")
        cfg = load_config(args.config, args.set)
    # Inside a job RAY_ADDRESS points at the cluster; "auto" finds a local head otherwise. Never a new Ray.
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address or "auto"
    try:
        check_address(address)  # ray.init would retry for minutes at a dead address
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError) as e:
        print(f"error: ray.address: no Ray cluster at {address} ({str(e).splitlines()[0]})", file=sys.stderr)
        return EXIT_BAD_INPUT
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    problem = storage_problem(cfg.output_dir, nodes, SHARED_PREFIXES + extra)
    storage = cfg.ray.storage_path
    if problem is None and storage and "://" not in storage:
        problem = storage_problem(storage, nodes, SHARED_PREFIXES + extra)
        problem = problem and problem.replace("output_dir:", "ray.storage_path:", 1)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    forwarded = [command, args.config] + [f"--set={s}" for s in args.set]
    if command == "run":
        forwarded += [f"--force={f}" for f in args.force]
    return main(forwarded)
