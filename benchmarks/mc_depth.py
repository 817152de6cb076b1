"""How many of the top layers MC-Dropout must sample: agreement with exact MC at every depth N.

`teachers[].mc.layers: N` runs the lower layers once per row and samples dropout only in the top N
layers and the head (`mc_dropout.mc_predict`). Per dataset, on real MiniLM teachers fine-tuned by the
engine's prepare stage, and the same pool texts for every variant:

- `exact`: every layer sampled (the default), mask seed 0;
- `exact, other seed`: the same with other masks: the agreement sampling noise alone allows (the
  noise floor: no cheaper estimate can agree with exact MC more often than exact MC agrees with itself);
- `layers N` for N = 1 .. depth - 1, mask seed 0.

Per variant: seconds of the teachers' K passes (in-process, one after another), the speedup over
exact, the agreement with exact (the same teacher picked by the MC score), selection accuracy (the
picked teacher owns the gold label) and supervision accuracy (its argmax is the gold label). The
recommended depth is the cheapest N whose agreement is within the noise floor on every dataset
measured (within `--tolerance` of `exact, other seed`); if none is, exact MC stays the default.

Each dataset is a piece, `results/runs/mc_depth/<dataset>.json`, written when it finishes (its
teachers are trained in the same piece, so every variant of a piece scores the same teachers); a
rerun skips finished pieces and assembles `results/mc_depth.{json,md}` from those present.

    python benchmarks/mc_depth.py                          # both datasets (BBC about 30 min on 2 cores)
    python benchmarks/mc_depth.py --dataset bbc_news
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
from reproduce import base_config  # noqa: E402
from reproduce_resume import commit, write_atomic  # noqa: E402
from throughput import stage_seconds  # noqa: E402

DATASETS = ("bbc_news", "20newsgroups")
SIZES = {"bbc_news": {"teacher_texts": 800, "texts": 200}, "20newsgroups": {"teacher_texts": 1200, "texts": 200}}
PIECES = RESULTS / "runs" / "mc_depth"


def sizes(dataset: str, args) -> dict:
    return {**SIZES[dataset], "samples": args.samples, "max_length": 128, "teacher_lr": 3e-4, "epochs": 3,
            "seed": 0}


def train_teachers(dataset: str, size: dict, work: Path):
    """The dataset's teachers, fine-tuned by the engine's prepare stage: (config, label space)."""
    from muki_ray.cache import stage_keys
    from muki_ray.cluster import connect
    from muki_ray.config import parse_config
    from muki_ray.labels import label_space
    from muki_ray.manifest import is_current
    from muki_ray.pipeline import prepare_stage

    ns = argparse.Namespace(pool=size["texts"], teacher_texts=size["teacher_texts"], dev=50, test=400,
                            samples=size["samples"], max_length=size["max_length"], teacher_lr=size["teacher_lr"],
                            epochs=1, student_lr=2e-4)
    raw = base_config(dataset, ns)
    raw["output_dir"] = str(work / dataset)
    cfg = parse_config(raw)
    space = label_space(cfg)
    connect(cfg.ray)
    if not is_current(work / dataset / "prepare", *stage_keys(cfg, space, work / dataset, "prepare")):
        prepare_stage(cfg, space, work / dataset)
    return cfg, space


def depth_piece(dataset: str, size: dict, work: Path, threads: int) -> dict:
    """Every variant on the dataset's teachers and pool texts."""
    import ray
    from transformers import AutoConfig

    from common import table
    from muki_ray.config import Source
    from muki_ray.config_file import teacher_model_path
    from muki_ray.integrate import selection_quality
    from muki_ray.teachers import TeacherSpec

    started = time.time()
    cfg, space = train_teachers(dataset, size, work)
    ray.shutdown()  # the MC passes below run in this process, with every core
    folders = [teacher_model_path(cfg, t) for t in cfg.teachers]
    depth = AutoConfig.from_pretrained(folders[0]).num_hidden_layers
    pool = table(Source(source=dataset, split="train", part=(0.5, 1.0), limit=size["texts"]))
    texts, gold = pool.column("text").to_pylist(), space.encode(pool.column("label").to_pylist())
    variants = {"exact": {}, "exact, other seed": {"seed": 1},
                **{f"layers {n}": {"layers": n} for n in range(1, depth)}}
    runs = {}
    for name, extra in variants.items():
        scores, probs, secs = [], [], 0.0
        for i, (t, folder) in enumerate(zip(cfg.teachers, folders)):
            spec = TeacherSpec(name=t.name, model_path=str(folder), labels=tuple(space.teacher_labels[i]),
                               samples=size["samples"], max_length=size["max_length"], threads=threads, **extra)
            s, _, parts = stage_seconds(spec, texts)
            secs += s
            scores.append(np.concatenate([o["mc_score"] for o in parts]))
            probs.append(np.concatenate([np.stack(o["mc_probs"]) for o in parts]))
        score = np.stack(scores, 1)
        q = selection_quality(score, probs, list(space.positions), len(space), gold)
        runs[name] = {"seconds": secs, "pick": score.argmax(1), "selection_accuracy": q["selection_accuracy"],
                      "supervision_accuracy": q["target_accuracy"]}
        print(f"{dataset} {name}: {secs:.1f} s, selection {q['selection_accuracy']:.3f}", flush=True)
    exact = runs["exact"]
    rows = [{"variant": name, "layers": variants[name].get("layers", depth), "seconds": round(r["seconds"], 2),
             "speedup": exact["seconds"] / r["seconds"], "agreement": float((r["pick"] == exact["pick"]).mean()),
             "selection_accuracy": r["selection_accuracy"], "supervision_accuracy": r["supervision_accuracy"]}
            for name, r in runs.items()]
    return {"dataset": dataset, "sizes": size, "depth": depth, "teachers": [t.name for t in cfg.teachers],
            "threads": threads, "rows": rows, "wall_s": round(time.time() - started, 1), "commit": commit(),
            "hardware": hardware()}


def recommend(pieces: dict, tolerance: float) -> dict:
    """The cheapest depth whose agreement is within `tolerance` of the noise floor on every dataset."""
    if not pieces:
        return {"layers": None, "why": "no dataset measured yet"}
    depth = min(p["depth"] for p in pieces.values())
    ok = []
    for n in range(1, depth):
        held = all(next(r for r in p["rows"] if r["variant"] == f"layers {n}")["agreement"] >=
                   floor(p) - tolerance for p in pieces.values())
        if held:
            ok.append(n)
    if not ok:
        return {"layers": None, "why": "no depth below the full one agrees with exact MC within the noise floor "
                f"(tolerance {tolerance}) on every measured dataset: exact MC stays the default"}
    return {"layers": ok[0], "why": f"the cheapest depth within {tolerance} of the noise floor on "
            f"{', '.join(sorted(pieces))}"}


def floor(piece: dict) -> float:
    return next(r for r in piece["rows"] if r["variant"] == "exact, other seed")["agreement"]


def write(pieces: dict, args) -> None:
    rec = recommend(pieces, args.tolerance)
    missing = [d for d in DATASETS if d not in pieces]
    out = {"datasets": pieces, "recommended": rec, "tolerance": args.tolerance, "missing": missing}
    write_atomic(RESULTS / "mc_depth.json", out)
    lines = ["# MC-Dropout depth: agreement with exact MC", "",
             "Written by `benchmarks/mc_depth.py` from the pieces in `results/runs/mc_depth/`. Teachers: MiniLM-L6 "
             "fine-tuned by the engine's prepare stage; every variant scores the same pool texts in-process, the "
             "teachers one after another. Agreement: the same teacher picked by the MC score as exact MC (mask "
             "seed 0). Noise floor: exact MC with other masks.", ""]
    if missing:
        lines += [f"Pieces missing: {', '.join(missing)}.", ""]
    for name, p in pieces.items():
        lines += [f"## {name}", "",
                  f"Sizes: {p['sizes']}; {len(p['teachers'])} teachers ({', '.join(p['teachers'])}); depth "
                  f"{p['depth']}; {p['threads']} torch threads; {p['hardware']}; commit {p['commit']}.", "",
                  "| variant | sampled layers | seconds | speedup | agreement with exact | selection acc | "
                  "supervision acc |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['layers']} | {r['seconds']:.1f} | {r['speedup']:.2f} | "
                  f"{r['agreement']:.3f} | {r['selection_accuracy']:.3f} | {r['supervision_accuracy']:.3f} |"
                  for r in p["rows"]]
        lines += [""]
    lines += [f"Recommended default depth: {rec['layers'] or 'every layer (exact MC)'}: {rec['why']}.", ""]
    tmp = RESULTS / "mc_depth.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(RESULTS / "mc_depth.md")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", action="append", choices=DATASETS, help="default: both")
    ap.add_argument("--work", type=Path, default=Path("runs/mc_depth"), help="teachers' folders (not stored)")
    ap.add_argument("--samples", type=int, default=16, help="K (the engine's default)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process passes")
    ap.add_argument("--tolerance", type=float, default=0.005, help="agreement this far under the floor still holds")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    PIECES.mkdir(parents=True, exist_ok=True)
    pieces = {p.stem: json.loads(p.read_text()) for p in sorted(PIECES.glob("*.json"))}
    for dataset in args.dataset or DATASETS:
        size = sizes(dataset, args)
        if dataset in pieces and pieces[dataset]["sizes"] == size:
            print(f"{dataset}: done ({PIECES / dataset}.json)")
            continue
        pieces[dataset] = depth_piece(dataset, size, args.work.resolve(), args.threads)
        write_atomic(PIECES / f"{dataset}.json", pieces[dataset])
        write(pieces, args)
    write(pieces, args)


if __name__ == "__main__":
    main()
