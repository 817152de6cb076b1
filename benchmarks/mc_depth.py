"""How many of the top layers MC-Dropout must sample: agreement with exact MC at every depth N.

`teachers[].mc.layers: N` runs the lower layers once per row and samples dropout only in the top N
layers and the head (`mc_dropout.mc_predict`). Per dataset, on real MiniLM teachers fine-tuned by the
engine's prepare stage, and the same pool texts for every variant:

- `exact`: every layer sampled (the default), mask seed 0;
- `exact, other seed`: the same with other masks: the agreement sampling noise alone allows (the
  noise floor: no cheaper estimate can agree with exact MC more often than exact MC agrees with itself);
- `layers N` for N = 1 .. depth - 1, mask seed 0.

Per variant, on `texts` pool texts: the agreement with exact (the same teacher picked by the MC
score), selection accuracy (the picked teacher owns the gold label) and supervision accuracy (its
argmax is the gold label). Speed: every variant's seconds on `speed_texts` of them, the variants
interleaved in one run, best of 2 rounds, and the speedup over exact. The recommended depth is the
cheapest N whose agreement is within the noise floor on every dataset measured (within `--tolerance`
of `exact, other seed`); if none is, exact MC stays the default. The pick stands only where the
pieces can resolve it: one standard error of an agreement difference near the floor f,
sqrt(2 (1 - f) / texts), must not exceed the tolerance (about 1,600 texts at f = 0.98 and 0.005);
a smaller run names the depth the rule would pick and keeps exact MC.

Each variant is a piece, `results/runs/mc_depth/<dataset>/<variant>.json` (its picks per text, the
teachers' folder fingerprint, sizes, commit, hardware), and so is the speed run (`speed.json`),
written as each finishes; a rerun skips the pieces whose sizes and teachers match, and assembles
`results/mc_depth.{json,md}` from those present, naming the missing ones. The teachers' folders are
not stored (`--work`): retrained teachers have another fingerprint, and their pieces are redone.

    python benchmarks/mc_depth.py                          # both datasets
    python benchmarks/mc_depth.py --dataset bbc_news
    python benchmarks/mc_depth.py --assemble               # the results from the pieces present, nothing run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware  # noqa: E402
from reproduce import base_config  # noqa: E402
from reproduce_resume import commit, write_atomic  # noqa: E402
from throughput import stage_seconds  # noqa: E402

DATASETS = ("bbc_news", "20newsgroups")
SIZES = {"bbc_news": {"teacher_texts": 800, "texts": 200, "speed_texts": 8},
         "20newsgroups": {"teacher_texts": 1200, "texts": 200, "speed_texts": 8}}
PIECES = RESULTS / "runs" / "mc_depth"
TEACHER_DEV = 50  # dev texts the teachers' prepare stage picks its best epoch on


def sizes(dataset: str, args) -> dict:
    texts = {"texts": args.texts} if args.texts else {}
    return {**SIZES[dataset], **texts, "samples": args.samples, "max_length": 128, "teacher_lr": 3e-4, "epochs": 3,
            "seed": 0}


def train_teachers(dataset: str, size: dict, work: Path):
    """The dataset's teachers, fine-tuned by the engine's prepare stage: (config, label space)."""
    from muki_ray.stages.cache import stage_keys
    from muki_ray.core.cluster import connect
    from muki_ray.config.schema import parse_config
    from muki_ray.config.labels import label_space
    from muki_ray.core.manifest import is_current
    from muki_ray.run.pipeline import prepare_stage

    ns = argparse.Namespace(pool=size["texts"], teacher_texts=size["teacher_texts"], dev=TEACHER_DEV, test=400,
                            samples=size["samples"], max_length=size["max_length"], teacher_lr=size["teacher_lr"],
                            epochs=1, student_lr=2e-4)
    raw = base_config(dataset, ns)
    raw["output_dir"] = str(work / dataset)
    cfg = parse_config(raw)
    space = label_space(cfg)
    if not is_current(work / dataset / "prepare", *stage_keys(cfg, space, work / dataset, "prepare")):
        connect(cfg.ray)  # Ray only to train them: a second embedded Ray beside another job's confuses Ray Train
        prepare_stage(cfg, space, work / dataset)
    return cfg, space


def variants(depth: int) -> dict:
    return {"exact": {}, "exact, other seed": {"seed": 1}, **{f"layers {n}": {"layers": n} for n in range(1, depth)}}


def slug(variant: str) -> str:
    return variant.replace(", other seed", "-seed1").replace(" ", "-")


def teacher_specs(cfg, space, size: dict, threads: int, extra: dict) -> list:
    from muki_ray.config.config_file import teacher_model_path
    from muki_ray.stages.teachers import TeacherSpec

    return [TeacherSpec(name=t.name, model_path=str(teacher_model_path(cfg, t)),
                        labels=tuple(space.teacher_labels[i]), samples=size["samples"],
                        max_length=size["max_length"], threads=threads, **extra) for i, t in enumerate(cfg.teachers)]


def variant_piece(specs: list, space, texts: list[str], gold: np.ndarray) -> dict:
    """One variant over the texts: the teacher each text picks, selection and supervision accuracy."""
    from muki_ray.method.integrate import selection_quality

    scores, probs, secs = [], [], 0.0
    for spec in specs:
        s, _, parts = stage_seconds(spec, texts)
        secs += s
        scores.append(np.concatenate([o["mc_score"] for o in parts]))
        probs.append(np.concatenate([np.stack(o["mc_probs"]) for o in parts]))
    score = np.stack(scores, 1)
    q = selection_quality(score, probs, list(space.positions), len(space), gold)
    return {"pick": score.argmax(1).tolist(), "selection_accuracy": q["selection_accuracy"],
            "supervision_accuracy": q["target_accuracy"], "seconds_here": round(secs, 1)}


def speed_piece(cfg, space, size: dict, threads: int, texts: list[str], depth: int) -> dict:
    """Seconds of every variant on the same few texts, interleaved, best of 2 rounds (one run)."""
    best = {}
    for _ in range(2):
        for name, extra in variants(depth).items():
            secs = sum(stage_seconds(spec, texts)[0] for spec in teacher_specs(cfg, space, size, threads, extra))
            best[name] = min(best.get(name, float("inf")), secs)
    return {"texts": len(texts), "seconds": best, "speedup": {n: best["exact"] / s for n, s in best.items()}}


def pool_texts(dataset: str, n: int):
    """n texts no teacher saw: the train split's second half (stratified first n), then, where that
    half is shorter (BBC: 779 texts), the dev split's texts but the teachers' 50 dev texts, then the
    test split's."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from common import table
    from muki_ray.config.schema import Source

    parts = [table(Source(source=dataset, split="train", part=(0.5, 1.0), limit=n))]
    seen = table(Source(source=dataset, split="dev", limit=TEACHER_DEV)).column("id")
    for split in ("dev", "test"):
        have = sum(t.num_rows for t in parts)
        if have < n:
            t = table(Source(source=dataset, split=split)).select(parts[0].column_names)
            t = t.filter(pc.invert(pc.is_in(t.column("id"), value_set=seen)))
            parts.append(t.slice(0, n - have))
    return pa.concat_tables(parts)


def run_dataset(dataset: str, size: dict, work: Path, threads: int) -> dict:
    """Every piece of the dataset still missing, each written as it finishes; the pieces present."""
    import ray
    from transformers import AutoConfig

    from muki_ray.config.config_file import teacher_model_path
    from muki_ray.core.manifest import fingerprint, folder_fingerprint

    cfg, space = train_teachers(dataset, size, work)
    ray.shutdown()  # the MC passes below run in this process, with every core
    folders = [teacher_model_path(cfg, t) for t in cfg.teachers]
    teachers_fp = fingerprint([folder_fingerprint(f) for f in folders])
    depth = AutoConfig.from_pretrained(folders[0]).num_hidden_layers
    pool = pool_texts(dataset, size["texts"])
    texts, gold = pool.column("text").to_pylist(), space.encode(pool.column("label").to_pylist())
    if len(texts) < size["texts"]:  # every unseen text the dataset has; the pieces record how many
        print(f"{dataset}: {len(texts)} texts no teacher trained on (asked for {size['texts']})", flush=True)
        size = {**size, "texts": len(texts)}
    folder = PIECES / dataset
    folder.mkdir(parents=True, exist_ok=True)
    common = {"sizes": size, "teachers": [t.name for t in cfg.teachers], "teachers_fingerprint": teachers_fp,
              "depth": depth, "threads": threads}
    for name, extra in [*variants(depth).items(), ("speed", None)]:
        path = folder / f"{slug(name)}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        if all(old.get(k) == v for k, v in common.items()):
            continue
        started = time.time()
        if extra is None:
            result = speed_piece(cfg, space, size, threads, texts[:size["speed_texts"]], depth)
        else:
            result = variant_piece(teacher_specs(cfg, space, size, threads, extra), space, texts, gold)
        write_atomic(path, {"variant": name, "layers": (extra or {}).get("layers", depth), **common, **result,
                            "wall_s": round(time.time() - started, 1), "commit": commit(), "hardware": hardware()})
        print(f"{dataset} {name}: done in {time.time() - started:.0f} s", flush=True)
    return assemble(dataset)


def assemble(dataset: str) -> Optional[dict]:
    """The dataset's table from its pieces with the exact run's teachers (None before that piece)."""
    folder = PIECES / dataset
    pieces = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
    exact = pieces.get("exact")
    if exact is None:
        return None
    same = {k: v for k, v in pieces.items() if v["teachers_fingerprint"] == exact["teachers_fingerprint"]}
    speed = same.get("speed", {})
    rows, missing = [], []
    for name in variants(exact["depth"]):
        p = same.get(slug(name))
        if p is None:
            missing.append(name)
            continue
        rows.append({"variant": name, "layers": p["layers"],
                     "agreement": float(np.mean(np.array(p["pick"]) == np.array(exact["pick"]))),
                     "disagreements": int(np.sum(np.array(p["pick"]) != np.array(exact["pick"]))),
                     "selection_accuracy": p["selection_accuracy"], "supervision_accuracy": p["supervision_accuracy"],
                     "seconds": speed.get("seconds", {}).get(name), "speedup": speed.get("speedup", {}).get(name)})
    if not speed:
        missing.append("speed")
    return {"dataset": dataset, "sizes": exact["sizes"], "depth": exact["depth"], "teachers": exact["teachers"],
            "threads": exact["threads"], "speed_texts": speed.get("texts"), "rows": rows, "missing": missing,
            "commits": sorted({p["commit"] for p in same.values()}), "hardware": exact["hardware"]}


def recommend(pieces: dict, tolerance: float) -> dict:
    """The cheapest depth whose agreement is within `tolerance` of the noise floor on every dataset."""
    if not pieces:
        return {"layers": None, "why": "no dataset measured yet"}
    if any(p["missing"] for p in pieces.values()) or len(pieces) < len(DATASETS):
        return {"layers": None, "why": "not every piece has run yet: the default stays exact MC until they have"}
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
    # Whether the pieces can tell a depth from the floor at all: the standard error of the difference
    # of two agreement rates near the floor f over n texts is about sqrt(2 (1 - f) / n). Where it is
    # larger than the tolerance, the pick rests on a text or two, and a default that changes every
    # teacher's numbers and every cache key is not changed on it.
    coarse = {d: resolution(p) for d, p in sorted(pieces.items()) if resolution(p) > tolerance}
    if coarse:
        need = max(texts_needed(p, tolerance) for p in pieces.values())
        return {"layers": None, "rule_pick": ok[0], "why": f"the rule picks {ok[0]} layers, but one standard error "
                "of an agreement difference (" + ", ".join(f"{d} {v:.3f}" for d, v in coarse.items()) +
                f") is larger than the tolerance {tolerance}: at this size the pick rests on one or two texts. "
                f"Exact MC stays the default until a run with about {need:,} texts per dataset (--texts) resolves it"}
    return {"layers": ok[0], "why": f"the cheapest depth within {tolerance} of the noise floor on "
            f"{', '.join(sorted(pieces))}"}


def resolution(piece: dict) -> float:
    """One standard error of the difference of two agreement rates near the piece's noise floor."""
    return math.sqrt(2 * max(1 - floor(piece), 1 / piece["sizes"]["texts"]) / piece["sizes"]["texts"])


def texts_needed(piece: dict, tolerance: float) -> int:
    """Texts at which `resolution` falls to `tolerance`, at the piece's noise floor."""
    return int(math.ceil(round(2 * max(1 - floor(piece), 0.005) / tolerance ** 2 / 100, 6)) * 100)


def floor(piece: dict) -> float:
    return next(r for r in piece["rows"] if r["variant"] == "exact, other seed")["agreement"]


def fmt(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(out: dict) -> str:
    """results/mc_depth.json -> its Markdown: per dataset, every variant's seconds, speedup, agreement with
    exact MC, selection and supervision accuracy; then the recommended depth."""
    pieces, rec, missing = out["datasets"], out["recommended"], out["missing"]
    lines = ["# MC-Dropout depth: agreement with exact MC", "",
             "Written by `benchmarks/mc_depth.py` from the pieces in `results/runs/mc_depth/`. Teachers: MiniLM-L6 "
             "fine-tuned by the engine's prepare stage; every variant scores the same pool texts in-process, the "
             "teachers one after another. Agreement: the same teacher picked by the MC score as exact MC (mask "
             "seed 0). Noise floor: exact MC with other masks. Seconds: the teachers' passes over the first "
             "`speed_texts` texts, the variants interleaved in one run, best of 2.", ""]
    if missing:
        lines += [f"Pieces missing: {', '.join(missing)}.", ""]
    for name, p in pieces.items():
        lines += [f"## {name}", "",
                  f"Sizes: {p['sizes']}; {len(p['teachers'])} teachers ({', '.join(p['teachers'])}); depth "
                  f"{p['depth']}; {p['threads']} torch threads; {p['hardware']}; commits {', '.join(p['commits'])}."
                  + (f" Missing: {', '.join(p['missing'])}." if p["missing"] else ""), "",
                  "| variant | sampled layers | seconds | speedup | agreement with exact | texts that pick another "
                  "teacher | selection acc | supervision acc |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['layers']} | {fmt(r['seconds'], 1)} | {fmt(r['speedup'], 2)} | "
                  f"{r['agreement']:.3f} | {r.get('disagreements', '-')} | {r['selection_accuracy']:.3f} | "
                  f"{r['supervision_accuracy']:.3f} |" for r in p["rows"]]
        lines += [""]
    lines += [f"Recommended default depth: {rec['layers'] or 'every layer (exact MC)'}: {rec['why']}.", ""]
    return "\n".join(lines)


def write(pieces: dict, args) -> None:
    rec = recommend(pieces, args.tolerance)
    missing = [d for d in DATASETS if d not in pieces] + \
        [f"{d}: {m}" for d, p in pieces.items() for m in p["missing"]]
    out = {"datasets": pieces, "recommended": rec, "tolerance": args.tolerance, "missing": missing}
    write_atomic(RESULTS / "mc_depth.json", out)
    text = render(out)
    tmp = RESULTS / "mc_depth.md.tmp"
    tmp.write_text(text)
    tmp.replace(RESULTS / "mc_depth.md")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", action="append", choices=DATASETS, help="default: both")
    ap.add_argument("--work", type=Path, default=Path("runs/mc_depth"), help="teachers' folders (not stored)")
    ap.add_argument("--samples", type=int, default=16, help="K (the engine's default)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process passes")
    ap.add_argument("--texts", type=int, default=None, help="pool texts per variant (default: SIZES)")
    ap.add_argument("--tolerance", type=float, default=0.005, help="agreement this far under the floor still holds")
    ap.add_argument("--assemble", action="store_true", help="only write results/mc_depth.{json,md} from the pieces present")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    pieces = {d: a for d in DATASETS if (a := assemble(d)) is not None}
    if args.assemble:
        write(pieces, args)
        return
    for dataset in args.dataset or DATASETS:
        pieces[dataset] = run_dataset(dataset, sizes(dataset, args), args.work.resolve(), args.threads)
        write(pieces, args)
    write(pieces, args)


if __name__ == "__main__":
    main()
