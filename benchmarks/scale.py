"""Scale: the teacher stage on pools of 10k to 1M texts and 2 to 16 teachers, against the code
before the scale-out and against a plain in-process loop.

Tiny random teachers (BERT, hidden 32, 2 layers, the MiniLM-L6 tokenizer, max_length 32, K=2), so
that the engine is measured and not the model. The pool is 20 Newsgroups texts (first 200
characters) repeated with unique ids. Each run is `muki-ray predict-teachers` (the pool stage and
the predictions stage) in its own process on an embedded Ray with 2 CPUs; teachers ask for 1 CPU
each, so 2 teacher slots. Per run: wall time, rows/s (pool rows x teachers / s), the driver's
peak RSS (sampled every 0.2 s), the object store's peak use and bytes spilled (sampled every 2 s),
and for the 16-teacher run the slot utilisation (the teachers' pipeline time / (slots x the
stage's wall time)).

    python benchmarks/scale.py [--baseline-commit C] [--cap-s 1200]

Run it from a frozen worktree of a commit. Writes results/scale.{json,md}; prints the goals last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLOTS = 2
RUNS = [(10_000, 2), (100_000, 2), (1_000_000, 2), (100_000, 16)]

DRIVER = textwrap.dedent("""
    import json, sys, threading, time
    import ray
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False)
    from ray._private.internal_api import memory_summary
    peak = {"store_mb": 0.0, "spilled_mb": 0.0}
    def poll():
        import re
        while True:
            try:
                s = memory_summary(stats_only=True)
                used = re.search(r"Plasma memory usage (\\d+) MiB", s)
                spilled = re.search(r"Spilled (\\d+) MiB", s)
                if used: peak["store_mb"] = max(peak["store_mb"], float(used.group(1)))
                if spilled: peak["spilled_mb"] = max(peak["spilled_mb"], float(spilled.group(1)))
            except Exception:
                pass
            time.sleep(2)
    threading.Thread(target=poll, daemon=True).start()
    from muki_ray.run.cli import main
    t0 = time.time()
    code = main(["predict-teachers", sys.argv[1]])
    print("RESULT " + json.dumps({"code": code, "wall_s": time.time() - t0, **peak}), flush=True)
""")


def tiny_teacher(folder: Path, labels: list[str], seed: int) -> Path:
    """A tiny random BERT classifier with the MiniLM-L6 tokenizer (the engine's work, not the model's)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from muki_ray.core.hf_folder import resolve_model_path

    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:minilm-l6"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=len(labels),
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def pool_file(path: Path, n: int, start: int = 0) -> Path:
    """n 20NG texts (first 200 characters), repeated, ids doc{start}..; appended to `path`."""
    from common import table
    from muki_ray.config.schema import Source

    texts = [t[:200] for t in table(Source(source="20newsgroups", split="train")).column("text").to_pylist()]
    with open(path, "a") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"doc{i}", "text": texts[i % len(texts)]}) + "\n")
    return path


def config(work: Path, pool: Path, teachers: int, models: Path) -> Path:
    raw = {"output_dir": str(work / "run"), "data": {"pool": {"source": str(pool)}},
           "teachers": [{"name": f"t{i}", "model": str(models / f"t{i % 4}"), "labels": ["a", "b"],
                         "batch_size": 512, "max_length": 32, "mc": {"samples": 2}, "resources": {"num_cpus": 1}}
                        for i in range(teachers)],
           "student": {"model": str(models / "t0")}, "ray": {"num_cpus": 2}}
    path = work / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def measure(code_dir: Path, cfg: Path, cap_s: float) -> dict:
    """Run the driver in its own process from `code_dir`; sample its RSS; stop it at `cap_s`."""
    env = {**os.environ, "PYTHONPATH": str(code_dir), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(cfg)], cwd=code_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ps, peak, t0 = psutil.Process(proc.pid), 0.0, time.time()
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        if time.time() - t0 > cap_s:
            for child in ps.children(recursive=True):
                child.kill()
            proc.kill()
            return {"stopped": f"over the {cap_s:.0f} s cap", "driver_peak_rss_mb": round(peak, 1)}
        time.sleep(0.2)
    out = proc.stdout.read()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None or json.loads(line[7:])["code"] != 0:
        return {"stopped": "failed", "driver_peak_rss_mb": round(peak, 1)}
    r = json.loads(line[7:])
    return {"wall_s": round(r["wall_s"], 2), "driver_peak_rss_mb": round(peak, 1),
            "object_store_peak_mb": r["store_mb"], "spilled_mb": r["spilled_mb"]}


def in_process_rows_per_s(models: Path, pool: Path, n: int) -> float:
    """The same tiny teachers in a plain loop in one process (2 torch threads), rows x teachers / s."""
    import torch

    from muki_ray.stages.teachers import TeacherSpec, TeacherStage

    torch.set_num_threads(SLOTS)
    texts = [json.loads(line)["text"] for _, line in zip(range(n), open(pool))]
    t0 = time.time()
    for i in range(2):
        stage = TeacherStage(TeacherSpec(name=f"t{i}", model_path=str(models / f"t{i}"), labels=("a", "b"),
                                         samples=2, max_length=32, threads=SLOTS))
        for s in range(0, n, 512):
            stage.predict(texts[s:s + 512], ids=[f"doc{j}" for j in range(s, min(n, s + 512))])
    return 2 * n / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "scale"))
    ap.add_argument("--baseline-commit", default=None, help="the commit before the scale-out (default: none run)")
    ap.add_argument("--cap-s", type=float, default=1200.0, help="stop a baseline run after this many seconds")
    ap.add_argument("--only", default=None, help="comma-separated POOLxTEACHERS runs, e.g. 10000x2")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models"
    for i in range(4):
        tiny_teacher(models / f"t{i}", ["a", "b"], seed=i)
    runs = [r for r in RUNS if not args.only or f"{r[0]}x{r[1]}" in args.only.split(",")]
    pools = {}
    for n in sorted({n for n, _ in runs} | {100_000}):
        pools[n] = work / f"pool-{n}.jsonl"
        if not pools[n].exists():
            pool_file(pools[n], n)

    results = []
    for n, k in runs:
        d = work / f"{n}x{k}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        r = measure(REPO, config(d, pools[n], k, models), cap_s=1e9)
        from muki_ray.core.manifest import read_manifest

        m = read_manifest(d / "run" / "predictions") or {}
        util = None
        if k > SLOTS and m:
            busy = sum(s["end"] - s["start"] for s in m["schedule"].values())
            util = round(busy / (SLOTS * m["wall_time_s"]), 3)
        results.append({"pool": n, "teachers": k, **r, "rows_per_s": round(n * k / r["wall_s"], 1),
                        "slot_utilization": util,
                        "stage_wall_s": {"pool": (read_manifest(d / "run" / "pool") or {}).get("wall_time_s"),
                                         "predictions": m.get("wall_time_s")}})
        print(json.dumps(results[-1]), flush=True)

    # A pool grown by 10%: reuse the 100k x 2 run's caches, add 10k new texts.
    grow = None
    base = work / "100000x2"
    if (base / "run" / "predictions").exists():
        grown = work / "pool-110000.jsonl"
        shutil.copy(pools[100_000], grown)
        pool_file(grown, 10_000, start=100_000)
        full = next(r for r in results if r["pool"] == 100_000 and r["teachers"] == 2)
        r = measure(REPO, config(base, grown, 2, models), cap_s=1e9)
        from muki_ray.core.manifest import read_manifest

        m = read_manifest(base / "run" / "predictions")
        grow = {"wall_s": r["wall_s"], "full_wall_s": full["wall_s"], "ratio": round(r["wall_s"] / full["wall_s"], 3),
                "rows_computed": m["rows_computed"], "rows_reused": m["rows_reused"]}
        print(json.dumps({"grow": grow}), flush=True)

    baseline = None
    if args.baseline_commit:
        old = work / "baseline-src"
        if not old.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(old), args.baseline_commit], cwd=REPO, check=True)
        baseline = {"commit": args.baseline_commit, "runs": []}
        for n, k in runs:
            d = work / f"baseline-{n}x{k}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            r = measure(old, config(d, pools[n], k, models), cap_s=args.cap_s)
            if "wall_s" in r:
                r["rows_per_s"] = round(n * k / r["wall_s"], 1)
            baseline["runs"].append({"pool": n, "teachers": k, **r})
            print(json.dumps({"baseline": baseline["runs"][-1]}), flush=True)

    in_proc = in_process_rows_per_s(models, pools[100_000], 100_000)
    out = {"hardware": hardware(), "slots": SLOTS, "teacher": "tiny BERT (hidden 32, 2 layers), MiniLM tokenizer, "
           "max_length 32, K=2, batch 512, 1 CPU per actor", "texts": "20 Newsgroups train, first 200 characters, "
           "repeated with unique ids", "runs": results, "in_process_rows_per_s": round(in_proc, 1),
           "grow_10pct_ratio": grow and grow["ratio"], "grow": grow, "baseline": baseline}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(out, indent=2))
    lines = ["# Scale", "", f"Hardware: {out['hardware']}. Teachers: {out['teacher']}. Texts: {out['texts']}.", "",
             runs_table(out), "", f"In-process loop at 100k: {in_proc:.0f} rows/s.", "", goals_table(out)]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print()
    for a, b, c in goals(out):
        print(f"{a}: {b} (goal {c})")


def runs_table(out: dict) -> str:
    """One row per run (pool size x teachers): wall time, rows/s, memory, slot use, the baseline commit's wall."""
    lines = ["| pool | teachers | wall s | rows/s | driver peak RSS MB | object store peak MB | spilled MB | "
             "slot utilisation | baseline wall s |", "|---|---|---|---|---|---|---|---|---|"]
    old_by = {(r["pool"], r["teachers"]): r for r in (out["baseline"] or {}).get("runs", [])}
    for r in out["runs"]:
        o = old_by.get((r["pool"], r["teachers"]), {})
        lines.append(f"| {r['pool']:,} | {r['teachers']} | {r['wall_s']} | {r['rows_per_s']} | "
                     f"{r['driver_peak_rss_mb']} | {r['object_store_peak_mb']} | {r['spilled_mb']} | "
                     f"{r['slot_utilization'] if r['slot_utilization'] is not None else '-'} | "
                     f"{o.get('wall_s', o.get('stopped', '-'))} |")
    return "\n".join(lines)


def goals(out: dict) -> list[tuple]:
    """The issue's goals as (figure, measured, goal), each computed from the runs in `out`."""
    by = {(r["pool"], r["teachers"]): r for r in out["runs"]}
    in_proc, grow = out["in_process_rows_per_s"], out["grow"]
    goals = []
    if (10_000, 2) in by and (1_000_000, 2) in by:
        goals.append(("driver peak RSS, 1M - 10k (MB)", round(by[(1_000_000, 2)]["driver_peak_rss_mb"]
                                                          - by[(10_000, 2)]["driver_peak_rss_mb"], 1), "<= +300"))
    if (100_000, 2) in by and (1_000_000, 2) in by:
        goals.append(("time per row, 1M / 100k", round(by[(100_000, 2)]["rows_per_s"]
                                                        / by[(1_000_000, 2)]["rows_per_s"], 3), "<= 1.3"))
    if (100_000, 16) in by:
        goals.append(("16 teachers on 2 CPUs: slot utilisation", by[(100_000, 16)]["slot_utilization"], ">= 0.8"))
    if (100_000, 2) in by:
        goals.append(("engine / in-process loop at 100k", round(by[(100_000, 2)]["rows_per_s"] / in_proc, 3),
                      ">= 0.8"))
    if grow:
        goals.append(("pool grown by 10% / full teacher stage", grow["ratio"], "<= 0.2"))
    return goals


def goals_table(out: dict) -> str:
    """The goals as a table: figure, measured, goal."""
    return "\n".join(["| figure | measured | goal |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in goals(out)])


def render(result: dict) -> str:
    """The docs' tables for results/scale.json: the runs, then the goals."""
    return runs_table(result) + "\n\n" + goals_table(result)


if __name__ == "__main__":
    main()
