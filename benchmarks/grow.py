"""Growing coverage on 20 Newsgroups: start with 2 group families, add a 3rd, then a 4th.

The teachers are MiniLM-L6 fine-tuned on one family each (the reproduction benchmark's shared
`prepare` stage, reused when its sizes match). The unlabeled pool is fixed, as in real use: every
step reads the same texts, so the teachers already scored are served from their caches. Per step:

- the addition: the run's `predictions` stage wall time (only the new teacher is computed);
- a full recompute: the same stage for all N teachers in a fresh directory (no caches);
- union and per-part test accuracy of the warm-started student (`student.init_from` = the previous
  step's student) and of a student trained from scratch on the same targets.

    python benchmarks/grow.py

Writes results/grow.{json,md}; prints the addition/full ratios against the 1/N + 10% goal last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware  # noqa: E402
from reproduce import base_config  # noqa: E402

ORDER = ("comp", "rec", "sci", "rest")


def labeled_jsonl(path: Path, dataset: str, split: str, labels: list[str], limit: int) -> str:
    """The split's first `limit` texts (stratified) whose label is in `labels`, as JSONL."""
    from muki_ray.config import Source
    from common import table

    rows = table(Source(source=dataset, split=split, limit=limit))
    rows = [r for r in rows.select(["id", "text", "label"]).to_pylist() if r["label"] in labels]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def step_config(raw: dict, families: list[str], work: Path, args, *, init_from: str | None) -> dict:
    """The run config for `families`: teachers are the prepared folders; dev/test cover their union."""
    teachers = {t["name"]: t for t in raw["teachers"]}
    labels = [lab for f in families for lab in teachers[f]["labels"]]
    cfg = json.loads(json.dumps(raw))
    cfg.pop("prepare")
    cfg["teachers"] = [{**teachers[f], "model": str(work.parent / "shared" / "prepare" / f)} for f in families]
    tag = "+".join(families)
    cfg["data"]["pool_gold_labels"] = False  # the fixed pool also holds texts of families not yet covered
    cfg["data"]["dev"] = {"source": labeled_jsonl(work / f"dev-{tag}.jsonl", "20newsgroups", "dev", labels, args.dev)}
    cfg["data"]["test"] = {"source": labeled_jsonl(work / f"test-{tag}.jsonl", "20newsgroups", "test", labels,
                                                   args.test)}
    cfg["integration"] = {"strategy": "muki_soft", "reweight": True}
    cfg["student"]["init_from"] = init_from
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--teacher-texts", type=int, default=1000)
    ap.add_argument("--dev", type=int, default=200)  # dev/test/pool/teacher sizes match reproduce.py,
    ap.add_argument("--test", type=int, default=444)  # so its 20NG teachers are reused
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--teacher-lr", type=float, default=3e-4)
    ap.add_argument("--student-lr", type=float, default=2e-4)
    ap.add_argument("--work", default="runs/reproduce", help="shares <work>/20newsgroups/shared with reproduce.py")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from muki_ray.labels import label_space
    from muki_ray.cluster import connect
    from muki_ray.config import parse_config
    from muki_ray.manifest import is_current, read_manifest
    from muki_ray.cache import stage_keys
    from muki_ray.pipeline import predict_stage, prepare_stage, run

    root = Path(args.work).resolve() / "20newsgroups"
    shared, work = root / "shared", root / "grow"
    if work.exists():
        shutil.rmtree(work)  # every measurement starts cold
    work.mkdir(parents=True)
    raw = base_config("20newsgroups", args)
    raw["output_dir"] = str(shared)
    raw["integration"] = {"strategy": "muki_soft"}
    cfg = parse_config(raw)
    space = label_space(cfg)
    connect(cfg.ray)
    if not is_current(shared / "prepare", *stage_keys(cfg, space, shared, "prepare")):
        prepare_stage(cfg, space, shared)

    steps, ratios, previous = [], [], None
    for n in range(2, len(ORDER) + 1):
        families = list(ORDER[:n])
        scfg = parse_config(step_config(raw, families, work, args, init_from=previous))
        sspace = label_space(scfg)
        grown = work / "run"
        t0 = time.time()
        run(scfg, sspace, grown)
        run_s = time.time() - t0
        pm = read_manifest(grown / "predictions")
        metrics = json.loads((grown / "metrics.json").read_text())
        full_dir = work / f"full-{n}"
        full = predict_stage(scfg, sspace, full_dir)  # every teacher, no caches
        step = {"teachers": families, "union_labels": len(sspace), "computed": pm["computed"],
                "reused": pm["reused"], "addition_s": pm["wall_time_s"], "full_recompute_s": full["wall_time_s"],
                "addition_vs_full": pm["wall_time_s"] / full["wall_time_s"], "goal_ratio": 1 / n + 0.10,
                "run_s": run_s, "warm_start": previous is not None,
                "test_accuracy": metrics["test_accuracy"], "test_accuracy_per_teacher":
                metrics["test_accuracy_per_teacher"]}
        if previous is not None:
            # The same targets, a student from scratch: does the warm start help?
            scratch = work / f"scratch-{n}"
            shutil.copytree(grown / "predictions", scratch / "predictions")
            scratch_cfg = parse_config({**step_config(raw, families, work, args, init_from=None),
                                        "output_dir": str(scratch)})
            t1 = time.time()
            run(scratch_cfg, sspace, scratch)
            sm = json.loads((scratch / "metrics.json").read_text())
            step.update(scratch_test_accuracy=sm["test_accuracy"],
                        scratch_test_accuracy_per_teacher=sm["test_accuracy_per_teacher"],
                        scratch_run_s=time.time() - t1)
        steps.append(step)
        ratios.append(step["addition_vs_full"])
        snapshot = work / f"student-{n}"
        shutil.copytree(grown / "student", snapshot)
        previous = str(snapshot)
        print(f"step {n}: {step['test_accuracy']:.4f} union acc, addition/full {ratios[-1]:.2f}", flush=True)

    result = {"dataset": "20newsgroups", "hardware": hardware(),
              "sizes": {"pool": args.pool, "teacher_texts": args.teacher_texts, "dev": args.dev, "test": args.test,
                        "samples": args.samples, "student_epochs": args.epochs, "max_length": args.max_length},
              "steps": steps, "addition_vs_full_ratio": ratios}
    met = all(s["addition_vs_full"] <= s["goal_ratio"] for s in steps[1:])
    headline = ("addition / full recompute of the teacher stage: "
                + ", ".join(f"N={len(s['teachers'])} {s['addition_vs_full']:.2f} (goal <= {s['goal_ratio']:.2f})"
                            for s in steps[1:]) + f"; goal {'met' if met else 'missed'}")
    result["headline"] = headline
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grow.json").write_text(json.dumps(result, indent=2))
    md = ["# Growing coverage on 20 Newsgroups", "",
          f"Sizes: {result['sizes']}. Hardware: {hardware()}. One seed.", "",
          "| teachers | union labels | computed | reused | addition (s) | full recompute (s) | addition / full "
          "| goal 1/N+0.1 | warm student acc | scratch student acc | per part (warm) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in s["test_accuracy_per_teacher"].items())
        scratch = f"{s['scratch_test_accuracy']:.4f}" if "scratch_test_accuracy" in s else "(first step)"
        md.append(f"| {'+'.join(s['teachers'])} | {s['union_labels']} | {', '.join(s['computed'])} | "
                  f"{', '.join(s['reused']) or '-'} | {s['addition_s']:.0f} | {s['full_recompute_s']:.0f} | "
                  f"{s['addition_vs_full']:.2f} | {s['goal_ratio']:.2f} | "
                  f"{s['test_accuracy']:.4f}{'' if s['warm_start'] else ' (scratch)'} | {scratch} | {parts} |")
    md += ["", headline]
    (RESULTS / "grow.md").write_text("\n".join(md) + "\n")
    print(headline)


if __name__ == "__main__":
    main()
