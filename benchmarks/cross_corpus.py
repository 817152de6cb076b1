"""Teachers from different corpora (issue #32): two BBC teachers beside a 20 Newsgroups teacher.

The paper claims MUKI merges teachers trained on different datasets. Here the two BBC teachers
and the 20NG `sci` teacher of `benchmarks/reproduce_resume.py` (their prepared folders, used as
a user's own `from_pretrained` folders) are merged over one JSONL pool that mixes the two corpora,
the 20NG texts a minority (--minority, default 10%). Dev and test mix both corpora too; the
student is judged on the union and on each teacher's labels. Methods: the paper's preset and the
default recipe, on one shared prediction pass, through the ordinary `run` pipeline.

    python benchmarks/cross_corpus.py [--teachers runs/reproduce_resume]

Needs the `teachers` pieces of bbc_news (--pool 800 --teacher-texts 800) and 20newsgroups in --teachers.
Writes results/cross_corpus.{json,md}.
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
from reproduce_resume import commit, write_atomic  # noqa: E402

METHODS = {"paper": {"preset": "paper", "strategy": "muki_soft", "reweight": True, "reweight_normalize": True},
           "default": {}}


def mixed(path: Path, bbc, ng, minority: float, seed: int = 0) -> dict:
    """JSONL of all `bbc` rows plus `ng` rows making `minority` of the file (seeded); label counts."""
    rng = np.random.default_rng(seed)
    n_ng = min(ng.num_rows, int(round(bbc.num_rows * minority / (1 - minority))))
    ng = ng.take(rng.permutation(ng.num_rows)[:n_ng])
    rows = [{"id": f"bbc-{i}", "text": t, "label": lab} for i, (t, lab) in
            enumerate(zip(bbc.column("text").to_pylist(), bbc.column("label").to_pylist()))]
    rows += [{"id": f"ng-{i}", "text": t, "label": lab} for i, (t, lab) in
             enumerate(zip(ng.column("text").to_pylist(), ng.column("label").to_pylist()))]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": len(rows), "ng_rows": n_ng}


def render(result: dict) -> str:
    """results/cross_corpus.json -> its Markdown: selection, supervision, the student and its parts, per method."""
    own, sizes, teachers = result["own_accuracy"], result["sizes"], list(result["own_accuracy"])
    md = ["# Teachers from different corpora", "",
          f"`python benchmarks/cross_corpus.py` (commit {result['commit']}; {result['hardware']}). Teachers: BBC t1, "
          f"BBC t2 and 20NG sci (own-part test accuracy {', '.join(f'{t} {v:.3f}' for t, v in own.items())}). Pool "
          f"{sizes['pool']['rows']} texts, {sizes['pool']['ng_rows']} of them 20NG ({result['minority']:.0%}); test "
          f"{sizes['test']['rows']} ({sizes['test']['ng_rows']} 20NG); K={result['samples']}, student "
          f"{result['student_epochs']} epochs.",
          "", "| method | selection | supervision | student | " + " | ".join(f"student on {t}" for t in teachers)
          + " | " + " | ".join(f"recall {t}" for t in teachers) + " |", "|---" * (4 + 2 * len(teachers)) + "|"]
    for r in result["rows"]:
        md.append(f"| {r['method']} | {r['selection_acc']:.3f} | {r['supervision_acc']:.3f} | {r['student_acc']:.3f} | "
                  + " | ".join(f"{r['per_teacher_acc'][t]:.3f}" for t in teachers) + " | "
                  + " | ".join(f"{r['per_teacher'][t]['recall']:.3f}" for t in teachers) + " |")
    md += ["", "Goals:", ""] + [f"- {g}" for g in result["goals"]]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teachers", type=Path, default=Path("runs/reproduce_resume"))
    ap.add_argument("--work", type=Path, default=Path("runs/cross_corpus"))
    ap.add_argument("--minority", type=float, default=0.10)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ng-test", type=int, default=200, help="20NG sci test texts (the BBC test split is whole)")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    import pyarrow as pa
    import pyarrow.compute as pc

    from muki_ray.core.cluster import connect
    from muki_ray.config.schema import parse_config
    from muki_ray.data.sources import builtin_part
    from muki_ray.config.labels import label_space
    from muki_ray.run.pipeline import run

    work = args.work.resolve()
    folders = {"bbc_t1": args.teachers / "bbc_news/shared/prepare/t1", "bbc_t2": args.teachers / "bbc_news/shared/prepare/t2",
               "ng_sci": args.teachers / "20newsgroups/shared/prepare/sci"}
    for name, f in folders.items():
        if not (f / "config.json").exists():
            raise SystemExit(f"{name}: no prepared teacher at {f} (run benchmarks/reproduce_resume.py's teachers piece)")
    sci = [lab for lab in json.loads((folders["ng_sci"] / "config.json").read_text())["id2label"].values()]

    def ng_part(split, part=(0.0, 1.0), limit=None):
        t = builtin_part("20newsgroups", split, part, None, 0)
        t = t.filter(pc.is_in(t.column("label"), value_set=pa.array(sci)))
        return t.slice(0, limit) if limit else t

    sizes = {"pool": mixed(work / "pool.jsonl", builtin_part("bbc_news", "train", (0.5, 1.0), None, 0),
                           ng_part("train", (0.5, 1.0)), args.minority),
             "dev": mixed(work / "dev.jsonl", builtin_part("bbc_news", "dev", (0.0, 1.0), None, 0), ng_part("dev"),
                          args.minority),
             "test": mixed(work / "test.jsonl", builtin_part("bbc_news", "test", (0.0, 1.0), None, 0),
                           ng_part("test", limit=args.ng_test), args.ng_test / (args.ng_test + 445))}
    teacher = {"mc": {"samples": args.samples}, "max_length": 128, "resources": {"num_cpus": 0.5, "threads": 2},
               "batch_size": 32}
    base = {"data": {"pool": {"source": str(work / "pool.jsonl")}, "dev": {"source": str(work / "dev.jsonl")},
                     "test": {"source": str(work / "test.jsonl")}, "pool_gold_labels": True},
            "teachers": [{"name": n, "model": str(f.resolve()), **teacher} for n, f in folders.items()],
            "student": {"model": "builtin:minilm-l6", "epochs": args.epochs, "lr": 2e-4, "batch_size": 16,
                        "max_length": 128, "resources_per_worker": {"CPU": 1.75}},
            "ray": {"num_cpus": 2}}
    rows, first = [], None
    for method, integ in METHODS.items():
        run_dir = work / method
        run_dir.mkdir(parents=True, exist_ok=True)
        if first is not None:  # one shared prediction pass
            for stage in ("pool", "predictions"):
                if not (run_dir / stage).exists():
                    (run_dir / stage).symlink_to(first / stage, target_is_directory=True)
        cfg = parse_config({**base, "output_dir": str(run_dir), "integration": integ})
        space = label_space(cfg)
        connect(cfg.ray)
        t0 = time.time()
        done = run(cfg, space, run_dir)
        first = first or run_dir
        metrics = json.loads((run_dir / "metrics.json").read_text())
        sup = json.loads((run_dir / "supervision.json").read_text())
        rows.append({"method": method, "student_acc": metrics["test_accuracy"],
                     "per_teacher_acc": metrics["test_accuracy_per_teacher"],
                     "selection_acc": sup["selection_accuracy"], "supervision_acc": sup["target_accuracy"],
                     "per_teacher": sup["per_teacher"], "estimated_shares": done["targets"].get("estimated_shares"),
                     "wall_s": round(time.time() - t0, 1)})
        print(method, rows[-1], flush=True)
    own = {}
    for n in folders:
        pieces = json.loads((RESULTS / "runs" / ("20newsgroups" if n == "ng_sci" else "bbc_news")
                             / "predictions.json").read_text())["calibration"]
        own[n] = next(c["own_accuracy"] for c in pieces if c["teacher"] == n.split("_")[-1])
    by = {r["method"]: r for r in rows}
    d, p = by["default"], by["paper"]
    zero = [t for r in rows for t, v in r["per_teacher_acc"].items() if v == 0 and r["method"] == "default"]
    goals = [f"default ≥ paper's preset: {'met' if d['student_acc'] >= p['student_acc'] else 'missed'} "
             f"({d['student_acc']:.3f} vs {p['student_acc']:.3f})",
             f"no part at 0 (default): {'met' if not zero else 'missed: ' + ', '.join(zero)}"]
    result = {"commit": commit(), "hardware": hardware(), "sizes": sizes, "minority": args.minority,
              "samples": args.samples, "student_epochs": args.epochs, "own_accuracy": own, "rows": rows,
              "goals": goals}
    write_atomic(RESULTS / "cross_corpus.json", result)
    tmp = RESULTS / "cross_corpus.md.tmp"
    tmp.write_text(render(result))
    tmp.replace(RESULTS / "cross_corpus.md")
    print("\n".join(goals))


if __name__ == "__main__":
    main()
