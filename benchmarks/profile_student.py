"""Where the student's time goes under Ray Train + DeepSpeed: py-spy on the training worker.

Runs the same 1-worker ZeRO-0 fp32 job as `student_throughput.py` and samples the RayTrainWorker
process with py-spy for `--seconds`, then attributes every sample to the call made from the
train loop's own lines (forward, backward, engine.step, the next batch, ...). A plain torch loop
over the same texts is timed in the same run for the per-step comparison.

    python benchmarks/profile_student.py

Writes results/student_profile.{json,md}; prints the shares last. py-spy comes with ray[default].
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bbc_texts, markdown_table, write_results  # noqa: E402
from student_throughput import LABELS, plain_loop, ray_run  # noqa: E402


def worker_pid(timeout: float = 300) -> int:
    """pid of the RayTrainWorker process, once it exists."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        if out:
            return int(out[0])
        time.sleep(0.5)
    raise RuntimeError("no RayTrainWorker process appeared")


def attribute(raw: str, loop: str = "train_loop_per_worker") -> collections.Counter:
    """py-spy raw stacks ("f1 (file:line);f2 (...) count") -> samples per call made from `loop`."""
    shares: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        idx = [i for i, f in enumerate(frames) if f.startswith(loop + " ")]
        if not idx:
            shares["outside the train loop"] += int(count)
            continue
        i = idx[-1]
        callee = frames[i + 1].split(" (")[0] if i + 1 < len(frames) else "(the loop's own lines)"
        shares[f"{callee} (line {frames[i].rsplit(':', 1)[-1].rstrip(')')})"] += int(count)
    return shares


def table_rows(res: dict) -> list[tuple]:
    """The 12 largest shares of py-spy's samples by the train loop's callee."""
    return [("call from the train loop", "share of samples")] + [
        (name, f"{share:.3f}") for name, share in list(res["shares"].items())[:12]]


def render(result: dict) -> str:
    """The docs' table for results/student_profile.json."""
    return markdown_table(table_rows(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seconds", type=int, default=40)
    args = ap.parse_args()

    import numpy as np
    import ray

    from muki_ray.core.hf_folder import resolve_model_path

    base = str(resolve_model_path("builtin:minilm-l6"))
    texts = bbc_texts(args.n)
    targets = np.random.default_rng(0).dirichlet(np.ones(len(LABELS)), size=len(texts))
    plain_eps = plain_loop(base, texts[:128], targets, 16, bf16=False)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = threading.Thread(target=lambda: result.update(
            ray_run(base, texts, targets, Path(tmp), workers=1, zero=0, bf16=False, batch=16)))
        run.start()
        pid = worker_pid()
        time.sleep(20)  # past start-up: model load, deepspeed.initialize, the first step
        raw = Path(tmp) / "stacks.txt"
        spy = Path(sys.executable).with_name("py-spy")  # installed beside python by ray[default]
        subprocess.run([str(spy if spy.exists() else "py-spy"), "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate", "50",
                        "--format", "raw", "--output", str(raw), "--nonblocking"], check=True,
                       capture_output=True)
        shares = attribute(raw.read_text())
        run.join()
    ray.shutdown()
    total = sum(shares.values())
    ray_eps = result["examples_per_s_steady"]
    headline = (f"student: Ray Train + DeepSpeed {ray_eps:.2f} ex/s steady vs plain loop {plain_eps:.2f} ex/s "
                f"({ray_eps / plain_eps:.2f}); top: " + ", ".join(f"{name} {n / total:.0%}"
                                                               for name, n in shares.most_common(4)))
    res = {"plain_eps": plain_eps, "ray_deepspeed_eps": ray_eps, "samples": total,
           "shares": {k: v / total for k, v in shares.most_common()}}
    write_results("student_profile", res, table_rows(res), headline)
    print(headline)


if __name__ == "__main__":
    main()
