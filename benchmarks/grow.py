"""Growing coverage on 20 Newsgroups with the default recipe: 2 group families, then 3, then 4.

The teachers' predictions are the reproduction's stored pass (benchmarks/results/runs/20newsgroups/
predictions: MiniLM-L6 teachers, one per family, K=8), so no teacher is recomputed here; the
first `--pool` rows of its pool are the unlabeled texts of every step (their buckets are ordered
by a hash of the id: a uniform sample, holding every family's texts). Per step, on the same
targets:

- `warm`: the default warm start from the previous step's `warm` student (`student.init_from`,
  head probe on);
- `warm_copy`: the warm start before the head probe (`student.head_probe_rows: 0`: old head rows
  copied by name, new rows at their fresh init), from the previous step's `warm_copy` student;
- `scratch`: a student from the base model.

Each student is a piece written as soon as it finishes (results/runs/grow/<step>-<variant>.json);
a rerun skips finished pieces whose student a later piece no longer needs. The teacher-stage cost
of an addition (only the new teacher is computed) was measured by the earlier version of this
script; its figures are kept in grow.json's `teacher_stage`.

    python benchmarks/grow.py [--pool 600 --epochs 2]

Writes results/grow.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware, markdown_table  # noqa: E402
from reproduce import METHODS  # noqa: E402
from reproduce_resume import commit, restore_predictions, run_config, write_atomic  # noqa: E402

ORDER = ("comp", "rec", "sci", "rest")
VARIANTS = ("warm", "warm_copy", "scratch")


def labeled_jsonl(path: Path, split: str, labels: list[str], limit: int) -> str:
    """The 20NG split's first `limit` texts whose label is in `labels`, as JSONL."""
    from muki_ray.config.schema import Source
    from common import table

    rows = table(Source(source="20newsgroups", split=split, limit=limit))
    rows = [r for r in rows.select(["id", "text", "label"]).to_pylist() if r["label"] in labels]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pool_subset(stored: Path, out: Path, rows: int) -> None:
    """The stored predictions' first `rows` rows, with their manifest, as a predictions stage."""
    import pyarrow.parquet as pq

    if (out / "manifest.json").exists():
        return
    table = pq.read_table(stored / "data").slice(0, rows)  # the stored pass: 2,000 rows, 2.3 MB
    (out / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "data" / "part-0.parquet")
    manifest = json.loads((stored / "manifest.json").read_text())
    manifest["rows"] = table.num_rows
    write_atomic(out / "manifest.json", manifest)


def step_config(raw: dict, families: list[str], work: Path, args) -> dict:
    """The run config of one step: its families' teachers, the default recipe, dev/test of its union."""
    cfg = json.loads(json.dumps(raw))
    teachers = {t["name"]: t for t in cfg["teachers"]}
    cfg["teachers"] = [teachers[f] for f in families]
    labels = [lab for f in families for lab in teachers[f]["labels"]]
    tag = "+".join(families)
    cfg["data"]["pool_gold_labels"] = False  # the fixed pool also holds texts of families not yet covered
    cfg["data"]["dev"] = {"source": labeled_jsonl(work / f"dev-{tag}.jsonl", "dev", labels, args.dev)}
    cfg["data"]["test"] = {"source": labeled_jsonl(work / f"test-{tag}.jsonl", "test", labels, args.test)}
    cfg["integration"] = dict(METHODS["default"])
    return cfg


def run_student(cfg_raw: dict, space, run_dir: Path, targets_dir: Path, predictions: Path) -> dict:
    """Train and evaluate one student on a step's targets (linked, not copied)."""
    from muki_ray.stages.cache import stage_keys
    from muki_ray.config.schema import parse_config
    from muki_ray.core.manifest import is_current, read_manifest
    from muki_ray.run.pipeline import evaluate_stage, train_stage

    run_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("predictions", predictions), ("targets", targets_dir)):
        if not (run_dir / name).exists():
            (run_dir / name).symlink_to(target, target_is_directory=True)
    cfg = parse_config({**cfg_raw, "output_dir": str(run_dir)})
    t0 = time.time()
    for stage, fn in (("train", train_stage), ("evaluate", evaluate_stage)):
        if not is_current(run_dir / stage, *stage_keys(cfg, space, run_dir, stage)):
            fn(cfg, space, run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    grown = m.get("growth") or {}
    return {"test_acc": m["test_accuracy"], "per_part": m["test_accuracy_per_teacher"],
            "old_labels_acc": grown.get("old_labels_accuracy"), "new_labels_acc": grown.get("new_labels_accuracy"),
            "best_epoch": m.get("best_epoch"), "train_s": read_manifest(run_dir / "train")["wall_time_s"],
            "wall_s": round(time.time() - t0, 1), "head_probe": m.get("head_probe")}


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _secs(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _parts(p) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in (p or {}).items()) or "-"


def steps_table(steps: list[dict]) -> str:
    """One row per growth step: selection, the warm, warm_copy and scratch students, new labels, time, parts."""
    md = ["| teachers | labels | selection | warm | warm_copy | scratch | new labels: warm / warm_copy "
          "| warm train s / scratch train s | parts (warm) | parts (warm_copy) | parts (scratch) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        md.append(f"| {'+'.join(s['teachers'])} | {s['union_labels']} | {_f(s['selection_acc'])} | "
                  f"{_f(s['warm_acc'])} | {_f(s['warm_copy_acc'])} | {_f(s['scratch_acc'])} | "
                  f"{_f(s['new_labels_warm'])} / {_f(s['new_labels_warm_copy'])} | {_secs(s['warm_s'])} / "
                  f"{_secs(s['scratch_s'])} | {_parts(s['per_part_warm'])} | {_parts(s['per_part_warm_copy'])} | "
                  f"{_parts(s['per_part_scratch'])} |")
    return "\n".join(md)


def probe_table(steps: list[dict]) -> str:
    """The head probe per step: new-label rows predicted as a new label, and their margin, before / after."""
    rows = [("step", "rows", "new-label rows", "on a new label before / after", "margin before / after")]
    for s in (s for s in steps if s.get("head_probe")):
        p = s["head_probe"]
        b, a = p["before"], p["after"]
        rows.append(("+".join(s["teachers"]), p["rows"], b["new_label_rows"],
                     f"{_f(b['new_rows_on_new'])} / {_f(a['new_rows_on_new'])}",
                     f"{_f(b['new_margin'])} / {_f(a['new_margin'])}"))
    return markdown_table(rows)


def render(result: dict) -> str:
    """The docs' tables for results/grow.json: the steps, then the head probe."""
    parts = [steps_table(result["steps"])]
    if any(s.get("head_probe") for s in result["steps"]):
        parts.append(probe_table(result["steps"]))
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=600, help="rows of the stored 2,000-row pass")
    ap.add_argument("--dev", type=int, default=400)
    ap.add_argument("--test", type=int, default=800)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--student-lr", type=float, default=2e-4)
    ap.add_argument("--work", default="runs/grow")
    args = ap.parse_args()
    # run_config reads the reproduction's sizes; these are the stored pass's (its teachers' config).
    rargs = argparse.Namespace(dataset="20newsgroups", pool=2000, teacher_texts=2000, dev=args.dev, test=args.test,
                               samples=8, epochs=args.epochs, max_length=args.max_length, teacher_lr=3e-4,
                               student_lr=args.student_lr)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from muki_ray.core.cluster import connect
    from muki_ray.config.schema import parse_config
    from muki_ray.config.labels import label_space
    from muki_ray.run.pipeline import combine_stage

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pieces = RESULTS / "runs" / "grow"
    pieces.mkdir(parents=True, exist_ok=True)
    shared = work / "shared"
    restore_predictions(RESULTS / "runs" / "20newsgroups", shared)
    predictions = work / f"pool-{args.pool}" / "predictions"
    pool_subset(shared / "predictions", predictions, args.pool)
    raw = run_config(rargs)
    sizes = {"pool": args.pool, "dev": args.dev, "test": args.test, "student_epochs": args.epochs,
             "student_lr": args.student_lr, "max_length": args.max_length, "teachers": "stored 20NG pass, K=8"}
    connected = False
    previous = {"warm": None, "warm_copy": None}
    for n in range(2, len(ORDER) + 1):
        families = list(ORDER[:n])
        step_dir = work / f"step{n}"
        step_dir.mkdir(parents=True, exist_ok=True)
        base = {**step_config(raw, families, work, args), "output_dir": str(step_dir)}
        space = label_space(parse_config(base))
        variants = ("scratch",) if n == 2 else VARIANTS
        for variant in variants:
            piece = pieces / f"step{n}-{variant}.json"
            run_dir = step_dir / variant
            needed_later = n < len(ORDER) and variant != "scratch" or (n == 2 and variant == "scratch")
            if piece.exists() and (not needed_later or (run_dir / "student" / "config.json").exists()):
                if n == 2:
                    previous = {"warm": str(run_dir), "warm_copy": str(run_dir)}
                elif variant in previous:
                    previous[variant] = str(run_dir)
                continue
            if not connected:
                connect(parse_config(base).ray)
                connected = True
            if not (step_dir / "targets" / "manifest.json").exists():
                if not (step_dir / "predictions").exists():
                    (step_dir / "predictions").symlink_to(predictions, target_is_directory=True)
                combine_stage(parse_config(base), space, step_dir)
            student_cfg = json.loads(json.dumps(base))
            if variant != "scratch":
                student_cfg["student"]["init_from"] = previous[variant]
                if variant == "warm_copy":
                    student_cfg["student"]["head_probe_rows"] = 0
            started = time.time()
            print(f"piece step{n}-{variant}: started", flush=True)
            result = run_student(student_cfg, space, run_dir, step_dir / "targets", predictions)
            sup = json.loads((step_dir / "supervision.json").read_text()) \
                if (step_dir / "supervision.json").exists() else {}
            write_atomic(piece, {"step": n, "teachers": families, "variant": variant, "union_labels": len(space),
                                 "init_from": student_cfg["student"].get("init_from"), "sizes": sizes,
                                 "recipe": base["integration"], "commit": commit(), "hardware": hardware(),
                                 "selection_acc": sup.get("selection_accuracy"),
                                 "started": started, **result})
            print(f"piece step{n}-{variant}: {result['test_acc']:.4f} in {time.time() - started:.0f} s", flush=True)
            if n == 2:
                previous = {"warm": str(run_dir), "warm_copy": str(run_dir)}
            elif variant in previous:
                previous[variant] = str(run_dir)
    assemble(pieces, sizes)


def assemble(pieces: Path, sizes: dict) -> dict:
    """grow.{json,md} from the pieces present (a missing piece is named)."""
    old = json.loads((RESULTS / "grow.json").read_text()) if (RESULTS / "grow.json").exists() else {}
    teacher_stage = old.get("teacher_stage") or ({k: old[k] for k in ("sizes", "steps", "headline") if k in old}
                                                 if "addition_vs_full_ratio" in old else None)
    got = {p.stem: json.loads(p.read_text()) for p in sorted(pieces.glob("step*.json"))}
    steps, missing = [], []
    for n in range(2, len(ORDER) + 1):
        rec = {v: got.get(f"step{n}-{v}") for v in (("scratch",) if n == 2 else VARIANTS)}
        missing += [f"step{n}-{v}" for v, r in rec.items() if r is None]
        first = next((r for r in rec.values() if r), None)
        if first is None:
            continue
        prev = got.get(f"step{n - 1}-warm") or got.get(f"step{n - 1}-scratch") if n > 2 else None
        step = {"teachers": first["teachers"], "union_labels": first["union_labels"],
                "selection_acc": first.get("selection_acc"),
                "warm_acc": (rec.get("warm") or {}).get("test_acc"),
                "warm_copy_acc": (rec.get("warm_copy") or {}).get("test_acc"),
                "scratch_acc": (rec.get("scratch") or {}).get("test_acc"),
                "per_part_warm": (rec.get("warm") or {}).get("per_part"),
                "per_part_warm_copy": (rec.get("warm_copy") or {}).get("per_part"),
                "per_part_scratch": (rec.get("scratch") or {}).get("per_part"),
                "old_labels_before": (prev or {}).get("per_part"),
                "new_labels_warm": (rec.get("warm") or {}).get("new_labels_acc"),
                "new_labels_warm_copy": (rec.get("warm_copy") or {}).get("new_labels_acc"),
                "old_labels_warm": (rec.get("warm") or {}).get("old_labels_acc"),
                "warm_s": (rec.get("warm") or {}).get("train_s"), "scratch_s": (rec.get("scratch") or {}).get("train_s"),
                "head_probe": (rec.get("warm") or {}).get("head_probe")}
        steps.append(step)
    recipe = next((r["recipe"] for r in got.values()), None)
    result = {"dataset": "20newsgroups", "hardware": hardware(), "sizes": sizes, "recipe": recipe, "steps": steps,
              "missing": missing, "teacher_stage": teacher_stage}
    write_atomic(RESULTS / "grow.json", result)

    md = ["# Growing coverage on 20 Newsgroups (default recipe)", "",
          f"Sizes: {sizes}. Hardware: {hardware()}. One seed. Teachers: the reproduction's stored MC pass "
          "(one MiniLM-L6 teacher per group family). `warm`: warm start with the head probe (the default); "
          "`warm_copy`: warm start with old head rows copied and new rows fresh (before the probe); `scratch`: "
          "from the base model. Same targets within a step.", "", steps_table(steps)]
    if any(s.get("head_probe") for s in steps):
        md += ["", "Head probe (the cause, measured on the probe rows): share of the rows whose target is a new "
               "label that the head predicts as a new label, and the mean margin of the best new label over the "
               "best old one, with the copied head (before) and the fitted one (after).", "", probe_table(steps)]
    if missing:
        md += ["", f"Missing pieces: {', '.join(missing)} (rerun `python benchmarks/grow.py`)."]
    if teacher_stage:
        md += ["", "## Teacher stage of an addition (earlier run, paper preset)", "",
               f"{teacher_stage.get('headline', '')} Sizes: {teacher_stage.get('sizes')}."]
    (RESULTS / "grow.md").write_text("\n".join(md) + "\n")
    return result


if __name__ == "__main__":
    main()
