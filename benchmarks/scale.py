"""Scale: the teacher stage on pools of 10k to 1M texts and 2 to 16 teachers, against the commit
before this work, against a plain in-process loop, and on a pool grown by 10% and by 1%.

Tiny random teachers (BERT, hidden 32, 2 layers, the MiniLM-L6 tokenizer, max_length 32, K=2), so
that the engine is measured and not the model. The pool is 20 Newsgroups texts (first 200
characters) repeated with unique ids. Each run is `muki-ray predict-teachers` (the pool stage and
the predictions stage) in its own process on an embedded Ray with 2 CPUs; teachers ask for 1 CPU
each, so 2 teacher slots. Per run: wall time, rows/s (pool rows x teachers / s), the driver's
peak RSS (sampled every 0.2 s), the object store's peak use and bytes spilled (sampled every 2 s),
and for the 16-teacher run the slot utilisation (the teachers' pipeline time / (slots x the
stage's wall time)).

The work is split into pieces, each written to `results/runs/scale/<piece>.json` as it finishes
(its commit and hardware with it); a rerun skips the pieces present, and `results/scale.{json,md}`
are assembled from the pieces present, naming the missing ones. Ratios are taken within a piece:
the 2-teacher runs at 100k and 1M time the in-process loop (the same teachers, 2 torch threads)
right after the engine; a `grow-N` piece takes the `run-Nx2` piece's run directory (or runs the
full stage itself), then a copy of it given the pool grown by 10%, then another grown by 1%.

    python benchmarks/scale.py [--baseline-commit C] [--cap-s 1200] [--only PIECE,...]
    python benchmarks/scale.py --assemble      # the results from the pieces present, nothing run

Run it from a frozen worktree of a commit.
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
from typing import Optional

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware  # noqa: E402
from reproduce_resume import commit, write_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLOTS = 2
RUNS = [(100_000, 2), (10_000, 2), (1_000_000, 2), (100_000, 16)]   # the order they run in
IN_PROCESS = {100_000, 1_000_000}   # 2-teacher runs whose piece also times the in-process loop
GROWTH = (10, 1)                    # percent of the pool added
GROWN = (100_000, 1_000_000)        # pools grown (from their 2-teacher run)
PIECES = RESULTS / "runs" / "scale"
TEACHER = ("tiny BERT (hidden 32, 2 layers), MiniLM tokenizer, max_length 32, K=2, batch 512, 1 CPU per actor")

DRIVER = textwrap.dedent("""
    import json, sys, threading, time
    import ray
    try:  # the embedded Ray's settings of the code measured (none before they existed)
        from muki_ray.core.cluster import EMBEDDED_SYSTEM_CONFIG as system
    except ImportError:
        system = {}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False,
             _system_config=system)
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
    try:
        from muki_ray.run.cli import main
    except ImportError:  # the flat package before the subpackages (the baseline commit)
        from muki_ray.cli import main
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
    log = open(cfg.parent / "driver.log", "w")  # why a run failed
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(cfg)], cwd=code_dir, env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True)
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
    log.close()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None or json.loads(line[7:])["code"] != 0:
        return {"stopped": f"failed (see {cfg.parent / 'driver.log'})", "driver_peak_rss_mb": round(peak, 1)}
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


def stage_walls(run: Path) -> dict:
    from muki_ray.core.manifest import read_manifest

    return {s: (read_manifest(run / s) or {}).get("wall_time_s") for s in ("pool", "predictions")}


def run_piece(work: Path, models: Path, pools: dict, n: int, k: int, code: Path, cap_s: float) -> dict:
    """One fresh `predict-teachers` run of n texts and k teachers with the code at CODE."""
    from muki_ray.core.manifest import read_manifest

    d = work / f"{'baseline-' if code != REPO else ''}{n}x{k}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    r = measure(code, config(d, pools[n], k, models), cap_s=cap_s)
    out = {"pool": n, "teachers": k, **r}
    if "wall_s" not in r:
        return out
    m = read_manifest(d / "run" / "predictions") or {}
    util = None
    if k > SLOTS and m:
        busy = sum(v["end"] - v["start"] for v in m["schedule"].values())
        util = round(busy / (SLOTS * m["wall_time_s"]), 3)
    out.update(rows_per_s=round(n * k / r["wall_s"], 1), slot_utilization=util, stage_wall_s=stage_walls(d / "run"))
    if code == REPO and k == 2 and n in IN_PROCESS:
        out["in_process_rows_per_s"] = round(in_process_rows_per_s(models, pools[n], n), 1)
        out["engine_over_in_process"] = round(out["rows_per_s"] / out["in_process_rows_per_s"], 3)
    return out


def grow_piece(work: Path, models: Path, pools: dict, n: int) -> dict:
    """The full n x 2 run, then the same run directory given the pool grown by each of GROWTH.

    The full run is the `run-{n}x2` piece's own when it ran at this commit (its run directory is
    still there), else it is run here."""
    from muki_ray.core.manifest import read_manifest

    run_piece_path, base = PIECES / f"run-{n}x2.json", work / f"{n}x2"
    earlier = json.loads(run_piece_path.read_text()) if run_piece_path.exists() else {}
    if earlier.get("commit") == commit() and "wall_s" in earlier and (base / "run" / "predictions").is_dir():
        full = {k: earlier[k] for k in ("wall_s", "driver_peak_rss_mb", "object_store_peak_mb", "spilled_mb")}
        full["stage_wall_s"], full["from_piece"] = earlier["stage_wall_s"], run_piece_path.stem
    else:
        base = work / f"grow-{n}-full"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        full = measure(REPO, config(base, pools[n], 2, models), cap_s=1e9)
        full["stage_wall_s"] = stage_walls(base / "run")
    out = {"pool": n, "teachers": 2, "full": full, "grown": {}}
    for pct in GROWTH:
        # The texts are appended to the pool file the full run read, as a user grows a pool (then
        # the file is cut back): the pool stage reads only the appended lines.
        size = pools[n].stat().st_size
        pool_file(pools[n], n * pct // 100, start=n)
        d = work / f"grow-{n}-{pct}pct"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        shutil.copytree(base / "run", d / "run", symlinks=True)
        try:
            r = measure(REPO, config(d, pools[n], 2, models), cap_s=1e9)
        finally:
            os.truncate(pools[n], size)
        m = read_manifest(d / "run" / "predictions") or {}
        pool_m = read_manifest(d / "run" / "pool") or {}
        out["grown"][str(pct)] = {**r, "stage_wall_s": stage_walls(d / "run"), "rows_computed": m.get("rows_computed"),
                                  "rows_reused": m.get("rows_reused"), "rows_kept": m.get("rows_kept"),
                                  "pool_rows_kept": pool_m.get("rows_kept"),
                                  "ratio": round(r["wall_s"] / full["wall_s"], 3),
                                  "stage_ratio": round(m["wall_time_s"] / full["stage_wall_s"]["predictions"], 3)}
        shutil.rmtree(d, ignore_errors=True)
    return out


def pieces(baseline: Optional[str]) -> list[str]:
    names = []
    for n, k in RUNS:
        names += [f"run-{n}x{k}"] + ([f"grow-{n}"] if k == 2 and n in GROWN else [])
    return names + ([f"baseline-{n}x{k}" for n, k in RUNS] if baseline else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "scale"))
    ap.add_argument("--baseline-commit", default=None, help="the commit before this work (default: none run)")
    ap.add_argument("--cap-s", type=float, default=1800.0, help="stop a baseline run after this many seconds")
    ap.add_argument("--only", default=None, help="comma-separated pieces, e.g. run-10000x2,grow-100000")
    ap.add_argument("--assemble", action="store_true", help="only write results/scale.{json,md} from the pieces present")
    args = ap.parse_args()
    if not args.assemble:
        run_pieces(args)
    out = assemble()
    if not out["commits"]:
        print("no piece has run yet: results/scale.json is left as it is")
        return
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / "scale.json", out)
    (RESULTS / "scale.md").write_text("\n".join([
        "# Scale", "", f"Hardware: {out['hardware']}. Teachers: {out['teacher']}. Texts: {out['texts']}. "
        f"Commits: {', '.join(out['commits'])}.", "", render(out)]
        + ([f"\nPieces not run yet: {', '.join(out['missing'])}."] if out["missing"] else [])) + "\n")
    print()
    for a, b, c in goals(out):
        print(f"{a}: {b} (goal {c})")


def run_pieces(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models"
    for i in range(4):
        tiny_teacher(models / f"t{i}", ["a", "b"], seed=i)
    pools = {}
    for n in sorted({n for n, _ in RUNS}):
        pools[n] = work / f"pool-{n}.jsonl"
        if not pools[n].exists():
            pool_file(pools[n], n)
    old = None
    if args.baseline_commit:
        old = work / "baseline-src"
        if not old.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(old), args.baseline_commit], cwd=REPO, check=True)
    wanted = args.only.split(",") if args.only else None
    for name in pieces(args.baseline_commit):
        path = PIECES / f"{name}.json"
        if path.exists() or (wanted and name not in wanted):
            continue
        started = time.time()
        if name.startswith("grow-"):
            result = grow_piece(work, models, pools, int(name.split("-")[1]))
        else:
            kind, size = name.split("-")
            n, k = map(int, size.split("x"))
            result = run_piece(work, models, pools, n, k, old if kind == "baseline" else REPO,
                               args.cap_s if kind == "baseline" else 1e9)
        if str(result.get("stopped", "")).startswith("failed"):  # not a result: the rerun tries it again
            print(json.dumps({name: result}), flush=True)
            continue
        extra = {"baseline_commit": args.baseline_commit} if name.startswith("baseline") else {}
        write_atomic(path, {"piece": name, **result, **extra, "piece_wall_s": round(time.time() - started, 1),
                            "commit": commit(), "hardware": hardware()})
        print(json.dumps({name: result}), flush=True)


def assemble() -> dict:
    """results/scale.json's content from the pieces present."""
    got = {p.stem: json.loads(p.read_text()) for p in sorted(PIECES.glob("*.json"))} if PIECES.is_dir() else {}
    runs = [got[f"run-{n}x{k}"] for n, k in RUNS if f"run-{n}x{k}" in got]
    base = [got[f"baseline-{n}x{k}"] for n, k in RUNS if f"baseline-{n}x{k}" in got]
    expected = pieces(next((b["baseline_commit"] for b in base), "yes"))
    return {"hardware": next(iter(got.values()))["hardware"] if got else hardware(), "slots": SLOTS,
            "teacher": TEACHER, "texts": "20 Newsgroups train, first 200 characters, repeated with unique ids",
            "runs": runs, "grows": [got[f"grow-{n}"] for n in GROWN if f"grow-{n}" in got],
            "baseline": {"commit": base[0]["baseline_commit"], "runs": base} if base else None,
            "commits": sorted({p["commit"] for p in got.values()}), "missing": [p for p in expected if p not in got]}


def runs_table(out: dict) -> str:
    """One row per run (pool size x teachers): wall time, rows/s, memory, slot use, the in-process
    loop's rows/s timed beside it, the baseline commit's wall."""
    lines = ["| pool | teachers | wall s | rows/s | in-process rows/s | driver peak RSS MB | object store peak MB | "
             "spilled MB | slot utilisation | baseline wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    old_by = {(r["pool"], r["teachers"]): r for r in (out["baseline"] or {}).get("runs", [])}
    for r in out["runs"]:
        o = old_by.get((r["pool"], r["teachers"]), {})
        lines.append(f"| {r['pool']:,} | {r['teachers']} | {r.get('wall_s', r.get('stopped'))} | "
                     f"{r.get('rows_per_s', '-')} | {r.get('in_process_rows_per_s') or '-'} | "
                     f"{r['driver_peak_rss_mb']} | {r.get('object_store_peak_mb', '-')} | {r.get('spilled_mb', '-')} | "
                     f"{r['slot_utilization'] if r.get('slot_utilization') is not None else '-'} | "
                     f"{o.get('wall_s', o.get('stopped', '-'))} |")
    return "\n".join(lines)


def grow_ratios(out: dict) -> dict:
    """{(pool, percent): grown run's wall / the full run's}."""
    return {(g["pool"], int(p)): v["ratio"] for g in out.get("grows", []) for p, v in g["grown"].items()}


def goals(out: dict) -> list[tuple]:
    """The issue's goals as (figure, measured, goal), each computed from the runs in `out`."""
    by = {(r["pool"], r["teachers"]): r for r in out["runs"] if "wall_s" in r}
    goals = []
    if (10_000, 2) in by and (1_000_000, 2) in by:
        goals.append(("driver peak RSS, 1M - 10k (MB)", round(by[(1_000_000, 2)]["driver_peak_rss_mb"]
                                                          - by[(10_000, 2)]["driver_peak_rss_mb"], 1), "<= +300"))
    if (100_000, 2) in by and (1_000_000, 2) in by:
        goals.append(("time per row, 1M / 100k", round(by[(100_000, 2)]["rows_per_s"]
                                                        / by[(1_000_000, 2)]["rows_per_s"], 3), "<= 1.3"))
    if (100_000, 16) in by:
        goals.append(("16 teachers on 2 CPUs: slot utilisation", by[(100_000, 16)]["slot_utilization"], ">= 0.8"))
    for n in (100_000, 1_000_000):
        ratio = by[(n, 2)].get("engine_over_in_process") if (n, 2) in by else None
        if ratio is not None:
            goals.append((f"engine / in-process loop at {n // 1000:,}k", ratio, ">= 0.95"))
    for (n, pct), ratio in sorted(grow_ratios(out).items(), key=lambda x: (x[0][0], -x[0][1])):
        goals.append((f"{n // 1000:,}k pool grown by {pct}% / full teacher stage", ratio,
                      "<= 0.15" if pct == 10 else "<= 0.05"))
    return goals


def goals_table(out: dict) -> str:
    """The goals as a table: figure, measured, goal."""
    return "\n".join(["| figure | measured | goal |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in goals(out)])


def grow_table(out: dict) -> str:
    """The grown pools: the grown run against the full run of the same piece."""
    lines = ["| pool | grown by | wall s | full run's wall s | ratio | pool stage s | predictions stage ratio | "
             "rows computed per teacher | prediction rows kept | pool rows kept |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g in out["grows"]:
        for pct, r in sorted(g["grown"].items(), key=lambda x: -int(x[0])):
            lines.append(f"| {g['pool']:,} | {pct}% | {r['wall_s']} | {g['full']['wall_s']} | {r['ratio']} | "
                         f"{r['stage_wall_s']['pool']} | {r['stage_ratio']} | "
                         f"{max((r['rows_computed'] or {}).values(), default='-')} | {r['rows_kept']} | "
                         f"{r.get('pool_rows_kept', '-')} |")
    return "\n".join(lines)


def render(result: dict) -> str:
    """The docs' tables for results/scale.json: the runs, the grown pools, then the goals."""
    return runs_table(result) + ("\n\n" + grow_table(result) if result.get("grows") else "") + "\n\n" + goals_table(result)


if __name__ == "__main__":
    main()
