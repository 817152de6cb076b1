"""The credible reproduction as resumable pieces, each done once and written as it finishes.

A piece is one unit of work of at most about an hour on a 2-core CPU:

- `teachers`: fine-tune every teacher (the prepare stage; the weights stay in --work, not in git);
- `predictions`: one shared MC-Dropout pass of every teacher over the pool. Its output, the
  predictions parquet (pool ids, texts, gold labels, every teacher's columns), is kept in the
  results folder, so a later run, on any machine, never repeats the teacher pass;
- `<method>-seed<k>`: one student of one method and seed, trained on those predictions.

Each piece writes `results/runs/<dataset>/<piece>.json` (sizes, recipe, time, commit, hardware)
when it finishes, through a temporary file and a rename. A rerun skips every piece whose file
records the same sizes and recipe; a piece whose recipe changed (say the default recipe) is run
again, and the others stay valid. After every piece the tables `results/reproduce_<dataset>.{json,md}`
are assembled from the pieces present, naming the ones still missing.

    python benchmarks/reproduce_resume.py                  # 20 Newsgroups, the credible sizes
    python benchmarks/reproduce_resume.py --assemble-only  # rebuild the tables from the pieces
    python benchmarks/reproduce_resume.py --max-hours 2.5  # start no piece after 2.5 hours

The prototypes' embedding pass is not stored: it is part of every student piece that uses
prototypes (about 40 s of MiniLM forward over the pool, against about 20 min of training).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware  # noqa: E402
from reproduce import METHODS, base_config, calibration, methods_table, teacher_order  # noqa: E402

# Order: the bound first (it decides whether the sizes are credible), then one seed of every
# method, then the other seeds; the best baseline of the smaller run (entropy_soft) gets one seed.
HEADLINE = ("supervised", "oracle", "muki_soft+reweight", "default")
BASELINE = "entropy_soft"
BOUND_GOAL = 0.65


def plan(seeds: int) -> list[str]:
    students = [f"{m}-seed0" for m in (*HEADLINE, BASELINE)]
    students += [f"{m}-seed{s}" for s in range(1, seeds) for m in HEADLINE]
    return ["teachers", "predictions", *students]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def sizes(args) -> dict:
    return {"pool": args.pool, "teacher_texts": args.teacher_texts, "dev": args.dev, "test": args.test,
            "samples": args.samples, "student_epochs": args.epochs, "max_length": args.max_length,
            "teacher_lr": args.teacher_lr, "student_lr": args.student_lr}


def recipe(raw: dict, piece: str) -> dict:
    """What a piece's result depends on besides the sizes: the resolved integration and student
    config of a student piece (so a changed schema default reruns it), the teacher setup otherwise."""
    from muki_ray.config.schema import parse_config

    cfg = parse_config(raw)
    if piece in ("teachers", "predictions"):
        return {"prepare": cfg.prepare.model_dump(), "teachers": [t.model_dump() for t in cfg.teachers]}
    integ = cfg.integration.model_dump(exclude={"preset"})  # (placement keys: `without_placement`)
    student = cfg.student.model_dump()
    if student["init_from"] is None:  # the head probe only runs when a previous student is grown
        student.pop("head_probe_rows", None)
    return {"integration": integ, "student": student}


PLACEMENT = ("resources", "eval_resources", "resources_per_worker")  # where work runs, not what it computes


def without_placement(rec: dict) -> dict:
    """A recipe without its placement keys, so that a new scheduling option (such as
    `placement_timeout_s`) leaves finished pieces valid."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in PLACEMENT}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads(json.dumps(rec, default=str)))


class Pieces:
    """The pieces folder: which are done, and writing one."""

    def __init__(self, folder: Path, sizes: dict):
        self.folder, self.sizes = folder, sizes

    def done(self, piece: str, rec: dict) -> bool:
        p = self.folder / f"{piece}.json"
        if not p.exists():
            return False
        got = json.loads(p.read_text())
        return got.get("sizes") == self.sizes and without_placement(got.get("recipe") or {}) == without_placement(rec)

    def write(self, piece: str, rec: dict, started: float, result: dict) -> None:
        write_atomic(self.folder / f"{piece}.json", {
            "piece": piece, "sizes": self.sizes, "recipe": rec, "wall_s": round(time.time() - started, 1),
            "commit": commit(), "hardware": hardware(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **result})

    def read(self, piece: str):
        p = self.folder / f"{piece}.json"
        return json.loads(p.read_text()) if p.exists() else None


def stored_predictions(pieces: Path) -> Path:
    return pieces / "predictions"


def restore_predictions(pieces: Path, shared: Path) -> None:
    """Put the stored predictions where the combine stage reads them (shared/predictions)."""
    from muki_ray.core.manifest import read_manifest

    store = stored_predictions(pieces)
    if read_manifest(shared / "predictions") is not None or not (store / "manifest.json").exists():
        return
    tmp = shared / ".predictions.restore"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    shutil.copy(store / "data.parquet", tmp / "data" / "part-0.parquet")
    shutil.copy(store / "manifest.json", tmp / "manifest.json")
    shutil.rmtree(shared / "predictions", ignore_errors=True)
    os.replace(tmp, shared / "predictions")


def store_predictions(shared: Path, pieces: Path) -> dict:
    """Compact shared/predictions into one zstd parquet file beside its manifest, in the results."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    store = stored_predictions(pieces)
    tmp = store.with_name(store.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # One pass through a record-batch stream: the benchmark's pool is bounded (a few thousand rows).
    dataset = pads.dataset(str(shared / "predictions" / "data"), format="parquet")
    with pq.ParquetWriter(tmp / "data.parquet", dataset.schema, compression="zstd") as w:
        for batch in dataset.to_batches():
            w.write_batch(batch)
    shutil.copy(shared / "predictions" / "manifest.json", tmp / "manifest.json")
    shutil.rmtree(store, ignore_errors=True)
    os.replace(tmp, store)
    return {"stored_bytes": (store / "data.parquet").stat().st_size}


def run_students(method: str, seed: int, raw: dict, space, work: Path, shared: Path) -> dict:
    """One student of `method` on the shared predictions: targets, train, evaluate."""
    from muki_ray.config.schema import parse_config
    from muki_ray.core.manifest import is_current, read_manifest
    from muki_ray.stages.cache import stage_keys
    from muki_ray.run.pipeline import combine_stage, evaluate_stage, train_stage

    run_dir = work / f"{method}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "predictions"
    if not link.exists():
        link.symlink_to(shared / "predictions", target_is_directory=True)
    mraw = json.loads(json.dumps(raw))
    mraw["output_dir"] = str(run_dir)
    mraw["integration"] = METHODS[method]
    mraw["student"]["seed"] = seed
    cfg = parse_config(mraw)
    walls = {}
    for stage, fn in (("targets", combine_stage), ("train", train_stage), ("evaluate", evaluate_stage)):
        if not is_current(run_dir / stage, *stage_keys(cfg, space, run_dir, stage)):
            fn(cfg, space, run_dir)
        walls[stage] = read_manifest(run_dir / stage)["wall_time_s"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sup = json.loads((run_dir / "supervision.json").read_text())
    return {"method": method, "seed": seed, "test_acc": metrics["test_accuracy"],
            "per_teacher_acc": metrics["test_accuracy_per_teacher"], "dev_acc": metrics["dev_accuracy"],
            "best_epoch": metrics.get("best_epoch"), "supervision_acc": sup["target_accuracy"],
            "selection_acc": sup["selection_accuracy"], "selection_acc_mc": sup["mc"]["selection_accuracy"],
            "selection_acc_entropy": sup["entropy"]["selection_accuracy"],
            "supervision": {k: v for k, v in sup.items() if k in ("per_teacher", "shares")}, "stage_s": walls}


def assemble(args, pieces: Pieces, names: list[str], teachers_of: list[str]) -> dict:
    """results/reproduce_<dataset>.{json,md} from the pieces present; the missing ones named."""
    present = {p: pieces.read(p) for p in names}
    missing = [p for p, v in present.items() if v is None or v.get("sizes") != pieces.sizes]
    by_method: dict[str, list] = {}
    for p, v in present.items():
        if p not in missing and "-seed" in p:
            by_method.setdefault(v["method"], []).append(v)
    rows = []
    for method, runs in by_method.items():
        accs = [r["test_acc"] for r in runs]
        rows.append({"method": method, "seeds": len(runs), "test_acc_mean": float(np.mean(accs)),
                     "test_acc_std": float(np.std(accs)), "test_accs": accs,
                     "per_teacher_acc": {t: float(np.mean([r["per_teacher_acc"][t] for r in runs])) for t in teachers_of},
                     "supervision_acc": runs[0]["supervision_acc"], "selection_acc": runs[0]["selection_acc"],
                     "selection_acc_mc": runs[0]["selection_acc_mc"],
                     "selection_acc_entropy": runs[0]["selection_acc_entropy"],
                     "wall_s_per_seed": float(np.mean([r["wall_s"] for r in runs])),
                     "recipe": runs[0]["recipe"]["integration"], "commits": sorted({r["commit"] for r in runs})})
    order = {m: i for i, m in enumerate((*HEADLINE, BASELINE))}
    rows.sort(key=lambda r: order.get(r["method"], 99))
    teach, preds = present.get("teachers"), present.get("predictions")
    result = {"dataset": args.dataset, "hardware": hardware(), "sizes": pieces.sizes, "seeds": args.seeds,
              "rows": rows, "pieces_done": [p for p in names if p not in missing], "pieces_missing": missing,
              "teachers": (preds or {}).get("calibration") or [],
              "prepared": (teach or {}).get("teachers"),
              "teacher_stage_s": {"teachers": (teach or {}).get("wall_s"), "predictions": (preds or {}).get("wall_s")},
              "driver": "benchmarks/reproduce_resume.py"}
    by = {r["method"]: r for r in rows}
    goals = []
    sup, default, oracle, paper = (by.get(m) for m in ("supervised", "default", "oracle", "muki_soft+reweight"))
    if sup:
        goals.append(("supervised bound ≥ 0.65", sup["test_acc_mean"] >= BOUND_GOAL, f"{sup['test_acc_mean']:.4f}"))
    if default and oracle:
        d = (oracle["test_acc_mean"] - default["test_acc_mean"]) * 100
        goals.append(("default within 1.0 pt of oracle selection", d <= 1.0, f"{d:+.2f} pts behind"))
    if default and sup:
        d = (sup["test_acc_mean"] - default["test_acc_mean"]) * 100
        goals.append(("default within 3.0 pts of the bound", d <= 3.0, f"{d:+.2f} pts behind"))
    if default:
        goals.append(("default's selection ≥ 0.85", default["selection_acc"] >= 0.85, f"{default['selection_acc']:.4f}"))
    if default and paper:
        lead = (default["test_acc_mean"] - paper["test_acc_mean"]) * 100
        spread = max(default["test_acc_std"], paper["test_acc_std"]) * 100
        goals.append(("default ahead of the paper's MUKI by more than the seeds' spread", lead > spread,
                      f"{lead:+.2f} pts, spread {spread:.2f}"))
    result["goals"] = [{"goal": g, "met": bool(m), "measured": v} for g, m, v in goals]
    write_atomic(args.results / f"reproduce_{args.dataset}.json", result)
    md = [f"# Reproduction on {args.dataset}", "",
          f"Assembled by `benchmarks/reproduce_resume.py` from the pieces in `results/runs/{args.dataset}/`. "
          f"Sizes: {pieces.sizes}. The student's best epoch is chosen on dev; hyper-parameters as in the BBC "
          f"reproduction (chosen on dev, never on test). Hardware: {hardware()}.", "",
          f"Pieces done: {len(result['pieces_done'])} of {len(names)}"
          + (f"; missing: {', '.join(missing)}." if missing else "."), "",
          methods_table(rows, teachers_of, "s per seed")]
    if rows:
        md += ["", f"Hard selection on the pool by raw scores: MC-Dropout {rows[0]['selection_acc_mc']:.4f}, "
               f"plain entropy {rows[0]['selection_acc_entropy']:.4f} (the same predictions for every method)."]
    if result["teachers"]:
        md += ["", teachers_table(result["teachers"])]
    if result["goals"]:
        md += ["", goals_table(result["goals"])]
    (args.results / f"reproduce_{args.dataset}.md").write_text("\n".join(md) + "\n")
    return result


def teachers_table(calib: list[dict]) -> str:
    """Each teacher on the test split: own-part accuracy, ECE, mean top probability inside and outside."""
    md = ["| teacher | own-part test acc | ECE own | mean max-prob own | mean max-prob outside |", "|---|---|---|---|---|"]
    md += [f"| {c['teacher']} | {c['own_accuracy']:.4f} | {c['ece_own']:.4f} | "
           f"{c['mean_max_prob_own']:.4f} | {c['mean_max_prob_outside']:.4f} |" for c in calib]
    return "\n".join(md)


def goals_table(goals: list[dict]) -> str:
    """The run's goals: met or missed, and the measured figure."""
    md = ["| goal | met | measured |", "|---|---|---|"]
    return "\n".join(md + [f"| {g['goal']} | {'met' if g['met'] else 'missed'} | {g['measured']} |" for g in goals])


def render(result: dict) -> str:
    """The docs' tables for a results/reproduce_<dataset>.json this driver assembled: methods, teachers, goals."""
    parts = [methods_table(result["rows"], teacher_order(result), "s per seed")]
    if result["teachers"]:
        parts.append(teachers_table(result["teachers"]))
    if result["goals"]:
        parts.append(goals_table(result["goals"]))
    return "\n\n".join(parts)


def parser() -> argparse.ArgumentParser:
    """The driver's arguments: the credible sizes by default (benchmarks/shares.py reads them too)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["20newsgroups", "bbc_news"], default="20newsgroups")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=8, help="K (K=4, 8 and 16 selected within noise on 20NG)")
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--teacher-texts", type=int, default=2000)
    ap.add_argument("--dev", type=int, default=400)
    ap.add_argument("--test", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--teacher-lr", type=float, default=3e-4)
    ap.add_argument("--student-lr", type=float, default=2e-4)
    ap.add_argument("--work", default="runs/reproduce_resume")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the pieces and tables are written")
    ap.add_argument("--max-hours", type=float, default=None, help="start no new piece after this many hours")
    ap.add_argument("--only", default=None, help="comma-separated pieces to run (default: the whole plan)")
    ap.add_argument("--assemble-only", action="store_true")
    return ap


def run_config(args) -> dict:
    """The shared stages' raw config of a dataset at the given sizes (teachers, pool, dev, test)."""
    raw = base_config(args.dataset, args)
    raw["integration"] = {"strategy": "muki_soft"}
    return raw


def main() -> None:
    args = parser().parse_args()
    args.results = args.results.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from muki_ray.stages.cache import stage_keys
    from muki_ray.core.cluster import connect
    from muki_ray.config.schema import parse_config
    from muki_ray.config.labels import label_space
    from muki_ray.core.manifest import is_current, read_manifest
    from muki_ray.run.pipeline import ensure_pool, predict_stage, prepare_stage

    work = Path(args.work).resolve() / args.dataset
    shared = work / "shared"
    raw = {**run_config(args), "output_dir": str(shared)}
    cfg = parse_config(raw)
    space = label_space(cfg)
    pieces = Pieces(args.results / "runs" / args.dataset, sizes(args))
    names = plan(args.seeds)
    if args.assemble_only:
        print(json.dumps(assemble(args, pieces, names, list(space.teachers))["goals"], indent=1))
        return
    todo = [p for p in names if not args.only or p in args.only.split(",")]
    # The tables are this dataset's reproduction: a run of the shared pieces alone leaves them as they are.
    tables = any("-seed" in p for p in todo)
    t_start = time.time()
    connected = False
    for piece in todo:
        rec = recipe({**raw, "integration": METHODS[piece.rsplit("-seed", 1)[0]]} if "-seed" in piece else raw, piece)
        if pieces.done(piece, rec):
            continue
        if args.max_hours is not None and time.time() - t_start > args.max_hours * 3600:
            print(f"stopping before {piece}: --max-hours {args.max_hours} reached", flush=True)
            break
        if not connected:
            connect(cfg.ray)
            connected = True
        started = time.time()
        print(f"piece {piece}: started", flush=True)
        if piece == "teachers":
            if not is_current(shared / "prepare", *stage_keys(cfg, space, shared, "prepare")):
                prepare_stage(cfg, space, shared)
            result = {"teachers": read_manifest(shared / "prepare")["teachers"]}
        elif piece == "predictions":
            ensure_pool(cfg, space, shared)
            if not is_current(shared / "prepare", *stage_keys(cfg, space, shared, "prepare")):
                prepare_stage(cfg, space, shared)  # the weights are not kept across machines
            if not is_current(shared / "predictions", *stage_keys(cfg, space, shared, "predictions")):
                predict_stage(cfg, space, shared)
            m = read_manifest(shared / "predictions")
            calib = calibration(shared, cfg, space, args.dataset, args)
            result = {"rows": m["rows"], "predictions_s": m["wall_time_s"], "busy_s": m.get("busy_s"),
                      "calibration": calib, **store_predictions(shared, pieces.folder)}
        else:
            method, seed = piece.rsplit("-seed", 1)
            restore_predictions(pieces.folder, shared)
            if read_manifest(shared / "predictions") is None:
                raise SystemExit(f"piece {piece}: no predictions (run the predictions piece first)")
            result = run_students(method, int(seed), raw, space, work, shared)
        pieces.write(piece, rec, started, result)
        print(f"piece {piece}: done in {time.time() - started:.0f} s", flush=True)
        if tables:
            assemble(args, pieces, names, list(space.teachers))
    if tables:
        assemble(args, pieces, names, list(space.teachers))


if __name__ == "__main__":
    main()
