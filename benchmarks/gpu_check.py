"""The GPU path, checked on one GPU in under 8 minutes: real MiniLM teachers and student on BBC News.

For each precision (bf16, then fp32) one run of the whole pipeline on an embedded Ray with the GPU:
the teachers are fine-tuned once (the prepare stage, 1 epoch, on the GPU), then the teacher stage
(MC-Dropout, K=16), the targets, a ZeRO-3 student with 1 worker, and the evaluation. It asserts
where each stage ran (a teacher actor's device and autocast dtype, the student engine's device,
bf16 and optimizer, the exported student loaded by `transformers.pipeline` on the GPU), and writes
`results/gpu_check.{json,md}`: examples per second of each stage and the GPU's peak memory during
it (nvidia-smi, sampled every 0.2 s), for both precisions.

    python benchmarks/gpu_check.py             # on a machine with one GPU
    python benchmarks/gpu_check.py --smoke     # the same code path on CPU at toy sizes; writes to a temp dir

Without a GPU (and without --smoke) it writes nothing and exits 2: the committed results file then
keeps saying that the check has not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware  # noqa: E402

STAGE_NAMES = ("predictions", "targets", "train", "evaluate")


class GpuMemory:
    """The GPU's used memory (MiB, nvidia-smi), sampled in a thread; `peak(t0, t1)` over a window."""

    def __init__(self, every_s: float = 0.2):
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.every_s = every_s
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _read(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return float(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _run(self):
        while not self.stop.wait(self.every_s):
            used = self._read()
            if used is not None:
                self.samples.append((time.time(), used))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)

    def peak(self, t0: float, t1: float):
        inside = [m for t, m in self.samples if t0 <= t <= t1]
        return max(inside) if inside else None


def config(args, out: Path, precision: str, teachers_from: Path | None) -> dict:
    gpu = not args.smoke
    bbc = {"source": "bbc_news"}
    teachers = [{"name": f"t{i}", "mc": {"samples": args.samples}, "max_length": args.max_length,
                 "precision": precision, "batch_size": args.batch_size,
                 "resources": {"num_gpus": 1 if gpu else 0, "num_cpus": 1}} for i in (1, 2)]
    if teachers_from is not None:  # the bf16 run's prepared teachers: fine-tuned once
        for t in teachers:
            t["model"] = str(teachers_from / t["name"])
    cfg = {
        "output_dir": str(out),
        "data": {"pool": {**bbc, "split": "train", "part": [0.5, 1.0], "limit": args.pool},
                 "dev": {**bbc, "split": "dev", "limit": args.dev}, "test": {**bbc, "split": "test", "limit": args.test}},
        "teachers": teachers,
        "integration": {},
        "student": {"model": "builtin:minilm-l6", "epochs": args.epochs, "batch_size": args.batch_size,
                    "max_length": args.max_length, "zero_stage": 3, "num_workers": 1, "use_gpu": gpu,
                    "precision": precision, "resources_per_worker": {"CPU": 1},
                    "eval_resources": {"num_gpus": 1 if gpu else 0, "num_cpus": 1}},
        "ray": {"num_cpus": args.cpus},
    }
    if teachers_from is None:
        cfg["prepare"] = {"data": {**bbc, "split": "train", "part": [0.0, 0.5], "limit": args.teacher_texts},
                          "model": "builtin:minilm-l6", "split": "contiguous", "epochs": 1, "lr": 3e-4,
                          "batch_size": args.batch_size, "max_length": args.max_length, "use_gpu": gpu,
                          "precision": precision, "resources_per_worker": {"CPU": 1}}
    return cfg


def teacher_device(spec, gpu: bool) -> dict:
    """Where a teacher actor of the stage runs: its device and autocast dtype, from the stage itself."""
    import ray

    from muki_ray.stages.teachers import TeacherStage

    @ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)
    def probe(s):
        stage = TeacherStage(s)
        return {"device": str(stage.device), "autocast": str(stage.dtype)}

    return ray.get(probe.remote(spec))


def run_precision(args, work: Path, precision: str, teachers_from, memory: GpuMemory) -> dict:
    from muki_ray.config.schema import parse_config
    from muki_ray.config.labels import label_space
    from muki_ray.core.manifest import read_manifest
    from muki_ray.run.pipeline import STAGE_FUNCTIONS
    from muki_ray.stages.teachers import teacher_specs

    out = work / precision
    cfg = parse_config(config(args, out, precision, teachers_from))
    space = label_space(cfg)
    gpu = not args.smoke
    stages = {}
    for stage in ("pool", "prepare", *STAGE_NAMES):
        if stage == "prepare" and cfg.prepare is None:
            continue
        t0 = time.time()
        STAGE_FUNCTIONS[stage](cfg, space, out)
        t1 = time.time()
        stages[stage] = {"wall_s": round(t1 - t0, 2), "peak_gpu_mib": memory.peak(t0, t1)}
    pool_rows = read_manifest(out / "pool")["rows"]
    train_log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    engine = next(r for r in train_log if r.get("event") == "engine" and not r["run"].startswith("prepare"))
    metrics = json.loads((out / "metrics.json").read_text())
    examples = {"predictions": pool_rows * len(cfg.teachers), "targets": pool_rows,
                "train": read_manifest(out / "targets")["rows"] * args.epochs, "evaluate": args.test}
    for stage, n in examples.items():
        stages[stage]["examples"] = n
        stages[stage]["ex_per_s"] = round(n / max(stages[stage]["wall_s"], 1e-9), 1)
    # Where each stage ran.
    teacher = teacher_device(teacher_specs(cfg, space)[0], gpu)
    want = "cuda" if gpu else "cpu"
    assert teacher["device"].startswith(want), teacher
    assert teacher["autocast"] == {"bf16": "torch.bfloat16", "fp32": "None"}[precision] or not gpu, teacher
    assert engine["device"].startswith(want), engine
    assert engine["bf16"] == (precision == "bf16"), engine
    import transformers

    clf = transformers.pipeline("text-classification", model=str(out / "student"), device=0 if gpu else -1)
    labels = {p["label"] for p in clf(["shares fell on the stock market", "the team won the cup final"])}
    assert labels <= set(space.names), labels
    return {"precision": precision, "stages": stages, "teacher_actor": teacher,
            "student_engine": {k: engine[k] for k in ("device", "bf16", "optimizer")},
            "test_accuracy": metrics.get("test_accuracy"), "dev_accuracy": metrics.get("dev_accuracy"),
            "export_loaded_on": want}


def write(results: Path, result: dict) -> None:
    results.mkdir(parents=True, exist_ok=True)
    tmp = results / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, results / "gpu_check.json")
    md = ["# GPU check", ""]
    if result["status"] != "ran":
        md += [f"**Not run yet**: {result['reason']}", "", "Run `python benchmarks/gpu_check.py` on a machine "
               "with one GPU (under 8 minutes); until then this project claims no GPU figures."]
    else:
        md += [f"Hardware: {result['hardware']}; GPU: {result['gpu']}. Sizes: {json.dumps(result['sizes'])}. "
               f"Total {result['wall_s']:.0f} s.", "", stages_table(result)]
        md += ["", "Where each stage ran: " + "; ".join(
            f"{r['precision']}: teacher actor {r['teacher_actor']['device']} (autocast {r['teacher_actor']['autocast']}),"
            f" student {r['student_engine']['device']} (bf16 {r['student_engine']['bf16']}, "
            f"{r['student_engine']['optimizer']}), export loaded on {r['export_loaded_on']}" for r in result["runs"])]
    tmp = results / "gpu_check.md.tmp"
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, results / "gpu_check.md")


def stages_table(result: dict) -> str:
    """One row per precision and stage: examples, examples/s, peak GPU memory."""
    md = ["| precision | stage | examples | ex/s | peak GPU MiB |", "|---|---|---|---|---|"]
    for run in result["runs"]:
        for stage, s in run["stages"].items():
            if "ex_per_s" in s:
                md.append(f"| {run['precision']} | {stage} | {s['examples']} | {s['ex_per_s']} | "
                          f"{s['peak_gpu_mib'] if s['peak_gpu_mib'] is not None else '-'} |")
    return "\n".join(md)


def render(result: dict) -> str:
    """The docs' table for results/gpu_check.json; a line saying why when it has not run on a GPU."""
    if result["status"] != "ran":
        return f"**Not run yet**: {result['reason']}"
    return stages_table(result)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes, results to a temp dir")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--not-run", metavar="REASON", help="write the results file saying the check has not run")
    args = p.parse_args()
    sizes = dict(pool=64, teacher_texts=64, dev=16, test=32, samples=2, epochs=1, max_length=32, batch_size=16,
                 cpus=2) if args.smoke else dict(pool=2000, teacher_texts=1000, dev=200, test=500, samples=16,
                                                  epochs=2, max_length=128, batch_size=32, cpus=8)
    for k, v in sizes.items():
        setattr(args, k, v)
    results = args.results or (Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.smoke else RESULTS)
    if args.not_run:
        write(results, {"status": "not run", "reason": args.not_run})
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing written (use --smoke to check the script on CPU)",
              file=sys.stderr)
        return 2
    import ray

    from muki_ray.core.cluster import connect
    from muki_ray.config.schema import RayConfig

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    t0 = time.time()
    connect(RayConfig(num_cpus=args.cpus))
    try:
        with GpuMemory() as memory:
            runs = [run_precision(args, work, "bf16", None, memory)]
            runs.append(run_precision(args, work, "fp32", work / "bf16" / "prepare", memory))
    finally:
        ray.shutdown()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (--smoke)"
    result = {"status": "ran", "hardware": hardware(), "gpu": gpu, "sizes": sizes, "seed": 0,
              "wall_s": round(time.time() - t0, 1), "runs": runs,
              "bf16_over_fp32_ex_per_s": {s: round(runs[0]["stages"][s]["ex_per_s"] / runs[1]["stages"][s]["ex_per_s"], 3)
                                          for s in ("predictions", "train", "evaluate")}}
    write(results, result)
    print(f"gpu_check: {result['wall_s']:.0f} s; results in {results}/gpu_check.md")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
