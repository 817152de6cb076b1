"""Student memory under ZeRO-0/2/3: per-worker RSS at model creation and at its peak, the driver's RSS
during the fit and export, and the step time; for this commit and a baseline commit.

Student: a randomly initialised BERT-large-shaped classifier (24 layers, hidden 1024, 16 heads,
about 335 M parameters) with the MiniLM-L6 tokenizer (same 30522-token vocabulary), 5 labels.
Each run: 2 CPU workers (gloo), 1 epoch of `--steps` micro-batches of `--batch` BBC texts per worker at
max length `--max-length`, fp32, through `student.train_classifier` (the path the pipeline takes,
export to a `from_pretrained` folder included). Every run is its own process with its own Ray, so the
driver's figures are not mixed between runs.

How it measures:
- worker RSS at init: each training worker's peak RSS right after the model is built (a Ray
  `worker_process_setup_hook` wraps the model builder student.py calls, on the baseline too);
- worker peak RSS: the same worker's peak RSS over the whole fit (export included);
- driver export delta: the driver's RSS sampled every 50 ms during `train_classifier`, minus its RSS
  just before (the baseline consolidates and exports on the driver);
- step time: seconds per micro-step from the epoch's examples/s (first step included).

Usage (from a frozen worktree; the baseline is another worktree):
    python benchmarks/student_memory.py --baseline /work/base_mem --baseline-commit 1bab87c
Writes results/student_memory.{json,md}; the headline figures are printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import bbc_texts, markdown_table, write_results  # noqa: E402

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
MODEL_DIR = HERE.parent / "runs" / "bench_models" / "bert-large-random"


def bert_large(folder: Path) -> Path:
    """A random BERT-large-shaped classifier with the MiniLM tokenizer, written once."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from muki_ray.core.hf_folder import resolve_model_path

    if (folder / "config.json").exists():
        return folder
    cfg = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                     label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    BertForSequenceClassification(cfg).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_model_path("builtin:minilm-l6")).save_pretrained(tmp)
    tmp.replace(folder)
    return folder


# ------------------------------------------------------------------ inside the training workers
def worker_hook() -> None:
    """Ray worker_process_setup_hook: record this process's peak RSS right after the model is built."""
    import muki_ray.student.training as student

    out = os.environ["MUKI_BENCH_RSS_DIR"]
    name = "build_model" if hasattr(student, "build_model") else "_build_model"  # this commit / the baseline
    build = getattr(student, name)

    def measured(*args, **kwargs):
        result = build(*args, **kwargs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(out, f"init-{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), "init_mb": peak}))

        def keep_peak():  # the process's peak so far, rewritten until it exits
            while True:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                tmp = Path(out, f".peak-{os.getpid()}")
                tmp.write_text(json.dumps({"pid": os.getpid(), "peak_mb": peak}))
                tmp.replace(Path(out, f"peak-{os.getpid()}.json"))
                time.sleep(0.2)

        threading.Thread(target=keep_peak, daemon=True).start()
        return result

    setattr(student, name, measured)


# ------------------------------------------------------------------ one run (a child process)
def child(args) -> None:
    import psutil
    import pyarrow as pa
    import ray

    from muki_ray.config.schema import TrainHyper
    from muki_ray.data.sources import to_ray_dataset
    from muki_ray.student.training import tokenize, train_classifier

    rss_dir = Path(args.rss_dir)
    os.environ["MUKI_BENCH_RSS_DIR"] = str(rss_dir)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "student_memory.worker_hook",
                          "env_vars": {"MUKI_BENCH_RSS_DIR": str(rss_dir), "DS_ACCELERATOR": "cpu"}})
    rows = 2 * args.batch * args.steps
    texts = bbc_texts(rows + 8)
    train = pa.table({"text": texts[:rows], "target": [[0.2] * len(LABELS)] * rows, "weight": [1.0] * rows})
    dev = pa.table({"text": texts[rows:], "label": [LABELS[i % len(LABELS)] for i in range(8)]})
    hyper = TrainHyper(epochs=1, batch_size=args.batch, zero_stage=args.zero, num_workers=2, max_length=args.max_length,
                       precision="fp32", warmup_ratio=0.0, resources_per_worker={"CPU": 0.75}, max_failures=0)
    train_ds = tokenize(to_ray_dataset(train), args.model, args.max_length)
    run_dir = Path(args.run_dir)
    me = psutil.Process()
    idle = me.memory_info().rss
    peak, stop = [idle], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    import muki_ray.method.losses as losses

    loss = "WeightedKLLoss" if hasattr(losses, "StudentLoss") else "weighted_kl"  # this commit / the baseline
    train_classifier(hyper, model_path=args.model, labels=LABELS, loss=loss, train_ds=train_ds,
                     dev_ds=to_ray_dataset(dev), rows=rows, run_dir=run_dir, name=f"mem-zero{args.zero}",
                     out_dir=run_dir / "student", parts={"all": list(range(len(LABELS)))})
    wall = time.time() - t0
    stop.set()
    sampler.join()
    epoch = next(json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()
                 if json.loads(line).get("event") == "epoch")
    inits = [json.loads(p.read_text()) for p in rss_dir.glob("init-*.json")]
    peaks = {json.loads(p.read_text())["pid"]: json.loads(p.read_text())["peak_mb"] for p in rss_dir.glob("peak-*.json")}
    assert len(inits) == 2, inits
    ray.shutdown()
    print("RESULT " + json.dumps({
        "zero_stage": args.zero,
        "worker_rss_at_init_mb": round(max(i["init_mb"] for i in inits), 1),
        "worker_peak_rss_mb": round(max(peaks.get(i["pid"], i["init_mb"]) for i in inits), 1),
        "driver_export_peak_delta_mb": round((peak[0] - idle) / 1024**2, 1),
        "step_s": round(2 * args.batch / epoch["examples_per_s"], 3),
        "fit_wall_s": round(wall, 1), "exported": (run_dir / "student" / "config.json").exists()}))


def runs(package_root: Path, model: Path, args) -> list[dict]:
    out = []
    for zero in args.zero:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "rss").mkdir()
            env = {**os.environ, "PYTHONPATH": f"{package_root}:{HERE}", "DS_ACCELERATOR": "cpu"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--zero-one", str(zero), "--model",
                   str(model), "--rss-dir", str(Path(tmp) / "rss"), "--run-dir", str(Path(tmp) / "run"),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--max-length", str(args.max_length)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"ZeRO-{zero} run at {package_root} failed:\n{proc.stderr[-4000:]}")
            out.append(json.loads(line[7:]))
            print(f"{package_root.name} ZeRO-{zero}: {out[-1]}", flush=True)
    return out


def table_rows(res: dict) -> list[tuple]:
    """One row per commit (this one, then the baseline's if measured) and ZeRO stage: worker and driver memory,
    step time."""
    rows = [("commit", "ZeRO", "worker RSS at init (MiB)", "worker peak RSS (MiB)", "driver peak delta (MiB)",
             "step (s)")]
    for label, rs in [(res["commit"], res["runs"])] + ([(res["baseline"]["commit"], res["baseline"]["runs"])]
                                                       if res.get("baseline") else []):
        rows += [(label, r["zero_stage"], r["worker_rss_at_init_mb"], r["worker_peak_rss_mb"],
                  r["driver_export_peak_delta_mb"], r["step_s"]) for r in rs]
    return rows


def render(result: dict) -> str:
    """The docs' table for results/student_memory.json."""
    return markdown_table(table_rows(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", default="0,2,3")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="micro-steps per worker")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--baseline", help="a worktree of the commit before partitioned loading and worker export")
    ap.add_argument("--baseline-commit", default="")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--zero-one", type=int, dest="zero_one")
    ap.add_argument("--model")
    ap.add_argument("--rss-dir")
    ap.add_argument("--run-dir")
    args = ap.parse_args()
    if args.child:
        args.zero = args.zero_one
        return child(args)
    args.zero = [int(z) for z in args.zero.split(",")]

    import torch
    from safetensors import safe_open

    model = bert_large(MODEL_DIR)
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    res = {"model": "random BERT-large shape (24 x 1024), MiniLM tokenizer", "parameters": params,
           "workers": 2, "batch": args.batch, "steps": args.steps, "max_length": args.max_length, "seed": 0,
           "threads": torch.get_num_threads(), "commit": commit,
           "runs": runs(HERE.parent, model, args)}
    if args.baseline:
        res["baseline"] = {"commit": args.baseline_commit, "runs": runs(Path(args.baseline).resolve(), model, args)}
    by = {r["zero_stage"]: r for r in res["runs"]}
    res["ratio_peak_zero3_over_zero0"] = by[3]["worker_peak_rss_mb"] / by[0]["worker_peak_rss_mb"]
    res["ratio_init_zero3_over_zero0"] = by[3]["worker_rss_at_init_mb"] / by[0]["worker_rss_at_init_mb"]
    res["ratio_step_zero3_over_zero0"] = by[3]["step_s"] / by[0]["step_s"]
    rows = table_rows(res)
    headline = (f"{params / 1e6:.0f} M-parameter student, 2 CPU workers: per-worker peak RSS ZeRO-3 / ZeRO-0 "
                f"{res['ratio_peak_zero3_over_zero0']:.2f} (at init {res['ratio_init_zero3_over_zero0']:.2f}); "
                f"driver peak during fit + export {max(r['driver_export_peak_delta_mb'] for r in res['runs']):.0f} "
                f"MiB above idle; step time ZeRO-3 / ZeRO-0 {res['ratio_step_zero3_over_zero0']:.2f}")
    if args.baseline:
        b = {r["zero_stage"]: r for r in res["baseline"]["runs"]}
        headline += (f"; baseline {args.baseline_commit}: peak ZeRO-3 / ZeRO-0 "
                     f"{b[3]['worker_peak_rss_mb'] / b[0]['worker_peak_rss_mb']:.2f}, driver delta up to "
                     f"{max(r['driver_export_peak_delta_mb'] for r in res['baseline']['runs']):.0f} MiB")
    write_results("student_memory", res, rows, headline)
    print(headline)


if __name__ == "__main__":
    main()
