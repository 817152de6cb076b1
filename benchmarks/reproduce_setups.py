"""The reproduction under the setups real users meet (#21): pools imbalanced across teachers, and
unequal teachers. Same rows and keys as `reproduce.py`'s results, plus a selection ablation.

    python benchmarks/reproduce_setups.py --setup imbalanced_major   # t1 owns >= 80% of the pool
    python benchmarks/reproduce_setups.py --setup imbalanced_minor   # t1 owns <= 5% of the pool
    python benchmarks/reproduce_setups.py --setup unequal            # t1 under-trained, t2 strong
    python benchmarks/reproduce_setups.py --setup balanced           # the default row on a balanced pool

The imbalanced and balanced pools are label-subsamples (seeded) of one superset pool of the BBC
train half (`--superset` texts), scored once: every setup links the superset's prepare stage and
teacher caches, so no teacher prediction is computed twice. `unequal` trains its own teachers
(t1: 1 epoch at lr 5e-5 on `--weak-texts` texts; t2: 3 epochs at lr 3e-4) through the per-teacher
`teachers[].prepare` settings. Writes results/reproduce_<dataset>_<setup>.{json,md}
(imbalanced: reproduce_<dataset>_imbalanced_<name>) and prints the default against the paper last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware  # noqa: E402
from reproduce import METHODS, add_run_args, base_config, method_row, methods_table  # noqa: E402
from selection import OPTIONS, measure  # noqa: E402

STUDENT_METHODS = ("supervised", "oracle", "uhc", "muki_soft+reweight", "default", "default+share")
PAPER, DEFAULT = "muki_soft+reweight", "default"


def args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setup", choices=["imbalanced_major", "imbalanced_minor", "unequal", "balanced"], required=True)
    ap.add_argument("--dataset", default="bbc_news", choices=["bbc_news"])
    add_run_args(ap, seeds=1, pool=300)  # --pool: texts of the balanced and unequal pools
    ap.add_argument("--superset", type=int, default=520, help="texts of the scored superset pool")
    ap.add_argument("--major", type=float, default=0.8, help="t1's share of the imbalanced_major pool")
    ap.add_argument("--minor", type=float, default=0.05, help="t1's share of the imbalanced_minor pool")
    ap.add_argument("--weak-texts", type=int, default=60, help="training texts of the unequal setup's weak t1")
    ap.add_argument("--methods", default=",".join(STUDENT_METHODS))
    ap.add_argument("--tag", default="", help="suffix of the results' name (a second variant of a setup)")
    return ap


def subsample(table, owners: dict, shares: dict, total: int, seed: int):
    """Rows of `table` with each teacher's labels in proportion `shares` (seeded); the largest
    pool of at most `total` texts the table can give. owners: label -> teacher."""
    rng = np.random.default_rng(seed)
    labels = np.array(table.column("label").to_pylist())
    by_teacher = {t: np.flatnonzero([owners[lab] == t for lab in labels]) for t in shares}
    n = min([total] + [int(len(idx) / s) for t, idx in by_teacher.items() if (s := shares[t]) > 0])
    take = np.concatenate([rng.permutation(idx)[:max(1, int(round(shares[t] * n)))] for t, idx in by_teacher.items()])
    return table.take(np.sort(take))


def write_pool(table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in table.select(["id", "text", "label"]).to_pylist()))
    tmp.replace(path)
    return path


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src, target_is_directory=True)


def main() -> None:
    args = args_parser().parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from common import table
    from muki_ray.stages.cache import stage_keys
    from muki_ray.config.labels import label_space
    from muki_ray.core.cluster import connect
    from muki_ray.config.schema import Source, parse_config
    from muki_ray.core.manifest import is_current, read_manifest
    from muki_ray.run.pipeline import ensure_pool, predict_stage, prepare_stage

    work = Path(args.work).resolve()
    name = f"{args.dataset}_{args.setup}" + (f"_{args.tag}" if args.tag else "")
    raw = base_config(args.dataset, args)
    raw["integration"] = {"preset": "paper"}
    t0 = time.time()

    def shared_stages(raw: dict, shared: Path) -> tuple:
        cfg = parse_config({**raw, "output_dir": str(shared)})
        space = label_space(cfg)
        connect(cfg.ray)
        for stage, fn in (("prepare", prepare_stage), ("predictions", predict_stage)):
            if stage == "predictions":
                ensure_pool(cfg, space, shared)  # the predictions' key names the pool
            if not is_current(shared / stage, *stage_keys(cfg, space, shared, stage)):
                fn(cfg, space, shared)
        return cfg, space

    if args.setup == "unequal":
        raw["teachers"][0]["prepare"] = {"epochs": 1, "lr": 5e-5, "texts": args.weak_texts}
        raw["data"]["pool"]["limit"] = args.pool
        shared = work / name / "shared"
        cfg, space = shared_stages(raw, shared)
        pool_desc = {"rows": args.pool, "source": "bbc_news train [0.5, 1.0), stratified"}
    else:
        # The superset: scored once; its prepare stage and teacher caches serve every pool below.
        superset = work / args.dataset / "superset"
        sraw = json.loads(json.dumps(raw))
        sraw["data"]["pool"]["limit"] = args.superset
        cfg, space = shared_stages(sraw, superset)
        owners = {lab: t for t, labs in zip(space.teachers, space.teacher_labels) for lab in labs}
        sup = table(Source(**sraw["data"]["pool"]))
        if args.setup == "balanced":
            pool = table(Source(**{**sraw["data"]["pool"], "limit": args.pool}))  # a stratified prefix
        else:
            t1 = args.major if args.setup == "imbalanced_major" else args.minor
            pool = subsample(sup, owners, {space.teachers[0]: t1, space.teachers[1]: 1 - t1}, args.pool, seed=0)
        shared = work / name / "shared"
        pool_file = write_pool(pool, work / name / "pool.jsonl")
        raw["data"]["pool"] = {"source": str(pool_file)}
        for stage in ("prepare", "cache"):
            link(superset / stage, shared / stage)
        cfg, space = shared_stages(raw, shared)
        counts = {t: sum(owners[lab] == t for lab in pool.column("label").to_pylist()) for t in space.teachers}
        pool_desc = {"rows": pool.num_rows, "per_teacher": counts,
                     "share_per_teacher": {t: c / pool.num_rows for t, c in counts.items()},
                     "source": f"seeded label-subsample of {sup.num_rows} bbc_news train [0.5, 1.0) texts"}
    predictions = read_manifest(shared / "predictions")
    shared_s = time.time() - t0
    ablation = measure(shared)  # selection only: every calibration, with and without prototypes
    print("selection:", {o: round(ablation[o]["all"], 3) for o in OPTIONS}, flush=True)
    rows = [method_row(m, args.seeds, raw, space, work / name, shared) for m in args.methods.split(",") if m]
    headline = write(args, name, space, rows, ablation, pool_desc, read_manifest(shared / "prepare")["teachers"],
                     predictions, shared_s)
    print(headline)


def ablation_table(ablation: dict, teachers: list[str]) -> str:
    """Selection alone by each option on the same predictions: all texts, low-margin ones, recall per teacher."""
    md = ["| selection | all | low-margin | " + " | ".join(f"recall {t}" for t in teachers) + " |",
          "|---" * (3 + len(teachers)) + "|"]
    for o, a in ablation.items():
        if not (isinstance(a, dict) and "all" in a):  # the options' entries; the rest describe the pool
            continue
        md.append(f"| {o} | {a['all']:.3f} | {a['low_margin']:.3f} | " +
                  " | ".join(f"{a['recall_per_teacher'][t]:.3f}" for t in teachers) + " |")
    return "\n".join(md)


def render(result: dict) -> str:
    """The docs' tables for results/reproduce_<setup>.json: the students (if any were trained), the selection
    ablation."""
    teachers = list(result["teachers"])
    parts = [methods_table(result["rows"], teachers, "s per seed")] if result["rows"] else []
    return "\n\n".join(parts + [ablation_table(result["ablation_selection"], teachers)])


def write(args, name: str, space, rows: list, ablation: dict, pool: dict, teachers: dict, predictions: dict,
          shared_s: float) -> str:
    by = {r["method"]: r for r in rows}
    headline = ""
    if PAPER in by and DEFAULT in by:
        p, d = by[PAPER], by[DEFAULT]
        headline = (f"{name}: default {d['test_acc_mean']:.4f} (selection {d['selection_acc']:.3f}) vs paper MUKI "
                    f"{p['test_acc_mean']:.4f} (selection {p['selection_acc']:.3f}): "
                    f"{(d['test_acc_mean'] - p['test_acc_mean']) * 100:+.2f} pts; parts " +
                    ", ".join(f"{t} {d['per_teacher_acc'][t]:.3f} vs {p['per_teacher_acc'][t]:.3f}" for t in space.teachers))
    own = {t: v.get("own_test_accuracy") for t, v in teachers.items()}
    result = {"dataset": args.dataset, "setup": args.setup, "hardware": hardware(), "seeds": args.seeds,
              "sizes": {"pool": pool, "samples": args.samples, "student_epochs": args.epochs,
                        "max_length": args.max_length, "dev": args.dev, "test": args.test},
              "teachers": teachers, "teacher_own_test_accuracy": own,
              "predictions": {"rows_computed": predictions.get("rows_computed"), "wall_time_s": predictions["wall_time_s"]},
              "shared_stage_time_s": shared_s, "ablation_selection": ablation, "rows": rows,
              "methods": {r["method"]: METHODS[r["method"]] for r in rows}, "headline": headline}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"reproduce_{name}.json").write_text(json.dumps(result, indent=2))
    md = [f"# Reproduction setup `{args.setup}` on {args.dataset}", "",
          f"Pool: {pool}. Teachers: " + "; ".join(
              f"{t} ({v.get('train_rows')} texts, {v.get('epochs')} epochs, lr {v.get('lr')}): own-part test "
              f"accuracy {v.get('own_test_accuracy')}" for t, v in teachers.items()) +
          f". K={args.samples}, student {args.epochs} epochs, {args.seeds} seed(s); hardware: {hardware()}.", "",
          methods_table(rows, list(space.teachers), "s per seed")]
    md += ["", f"Selection ablation (no student; {ablation['rows']} texts; estimated shares "
           f"{ {k: round(v, 3) for k, v in ablation['estimated_shares'].items()} }, true "
           f"{ {k: round(v, 3) for k, v in ablation['true_shares'].items()} }):", "",
           ablation_table(ablation, list(space.teachers))]
    md += ["", headline]
    (RESULTS / f"reproduce_{name}.md").write_text("\n".join(md) + "\n")
    return headline


if __name__ == "__main__":
    main()
