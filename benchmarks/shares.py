"""Teacher selection against each teacher's share of the pool: the share sweep of issue #32.

One shared prediction pass per dataset (the `predictions` piece of `benchmarks/reproduce_resume.py`,
stored in results/runs/<dataset>/predictions/), then pools where one teacher owns 2% ... 98% of the
texts, each a seeded subsample of that pass: the swept teacher's texts and the others' (which keep
their relative sizes), as many as the share allows. Per pool and method: selection accuracy (the
chosen teacher owns the gold label), supervision accuracy (the chosen teacher's argmax is the gold
label), each teacher's selection recall, and its estimated against its true share.

Methods, through the same math the combiner runs (in memory: `owners.owner_posteriors`,
`prototypes.prototype_scores`, `integrate.calibrate`):
- `paper`: raw MC scores (preset: paper);
- `default`: rank calibration + prototypes seeded with equal shares (the default recipe);
- `share`: share calibration (the owners' latent-class EM) + prototypes seeded with its posteriors;
- `oracle`: the teacher that owns the gold label.
A method's estimated share is the owners' model's π for `share` and its share of the selections
otherwise. Students: see `--students` (pieces in results/runs/shares/, resumable).

    python benchmarks/shares.py                        # every dataset whose predictions are stored
    python benchmarks/shares.py --students 0.05,0.5,0.95 --dataset bbc_news

Writes results/shares.{json,md} and results/shares.png.
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
from reproduce_resume import Pieces, commit, parser, run_config, write_atomic  # noqa: E402

SHARES = (0.02, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.98)
METHODS = ("paper", "default", "share", "oracle")
SWEPT = {"bbc_news": "t1", "20newsgroups": "sci"}  # the teacher whose share is swept
STUDENT_METHODS = {"paper": {"preset": "paper", "strategy": "muki_soft", "reweight": True, "reweight_normalize": True},
                   "default": {}, "share": {"calibration": "share"}}


def load(dataset: str, sizes: list[str]) -> dict:
    """The stored predictions of `dataset` as arrays, with the label space of its teachers."""
    import pyarrow.parquet as pq

    from muki_ray.config.schema import parse_config
    from muki_ray.config.labels import label_space

    args = parser().parse_args(["--dataset", dataset, *sizes])
    raw = {**run_config(args), "output_dir": "/tmp/unused"}
    space = label_space(parse_config(raw))
    store = RESULTS / "runs" / dataset / "predictions" / "data.parquet"
    t = pq.read_table(store)  # a benchmark's bounded pool (a few thousand rows), not an engine path
    gold = space.encode(t.column("label").to_pylist())
    return {"space": space, "raw": raw, "args": args, "ids": t.column("id").to_pylist(),
            "texts": t.column("text").to_pylist(), "gold": gold,
            "owner": space.owner_mask()[:, gold].T.argmax(1),  # disjoint teachers: one owner per label
            "mc": np.stack([np.asarray(t.column(f"{n}__mc_score").to_pylist()) for n in space.teachers], 1),
            "probs": [np.stack(t.column(f"{n}__probs").to_pylist()) for n in space.teachers]}


def embeddings(dataset: str, texts: list[str], work: Path) -> np.ndarray:
    """The prototypes' sentence embeddings (the student's MiniLM), cached in the work folder."""
    path = work / f"{dataset}_embeddings.npy"
    if path.exists():
        return np.load(path)
    from muki_ray.stages.embedding import EmbeddingSpec, EmbeddingStage
    from muki_ray.core.hf_folder import resolve_model_path

    stage = EmbeddingStage(EmbeddingSpec(model_path=str(resolve_model_path("builtin:minilm-l6")), threads=2))
    emb = np.concatenate([stage.embed(texts[i:i + 64]) for i in range(0, len(texts), 64)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


def selection_scores(method: str, emb: np.ndarray, mc: np.ndarray, probs: list, positions: list, n_union: int,
                     keys: np.ndarray):
    """(B, N) selection scores of one method, and its estimated shares (None: read off the selections)."""
    from muki_ray.method.integrate import calibrate
    from muki_ray.method.owners import owner_posteriors
    from muki_ray.method.prototypes import prototype_scores

    if method == "paper":
        return mc, None
    ranks = calibrate(mc, "rank")
    if method == "default":
        return prototype_scores(emb, ranks, probs, positions, n_union), None
    post, model = owner_posteriors(emb, ranks, n_union, keys=keys)
    return prototype_scores(emb, ranks, probs, positions, n_union, owners=post), model.shares


def subsample(owner: np.ndarray, swept: int, share: float, seed: int = 0) -> np.ndarray:
    """Row indices where teacher `swept` owns `share` of the texts, as many as the rows allow."""
    rng = np.random.default_rng(seed)
    mine, rest = np.flatnonzero(owner == swept), np.flatnonzero(owner != swept)
    total = min(len(mine) / share, len(rest) / (1 - share))
    take = int(round(share * total))
    return np.sort(np.concatenate([rng.permutation(mine)[:take], rng.permutation(rest)[:int(round(total)) - take]]))


def measure(d: dict, emb: np.ndarray, rows: np.ndarray, method: str) -> dict:
    from muki_ray.method.owners import row_keys

    space, owner = d["space"], d["owner"][rows]
    teachers, n = list(space.teachers), len(space.teachers)
    positions = list(space.positions)
    probs = [p[rows] for p in d["probs"]]
    if method == "oracle":
        chosen, est = owner, None
    else:
        scores, est = selection_scores(method, emb[rows], d["mc"][rows], probs, positions, len(space),
                                       row_keys([d["ids"][i] for i in rows]))
        chosen = scores.argmax(1)
    pred = np.array([positions[t][probs[t][i].argmax()] for i, t in enumerate(chosen)])
    true = np.bincount(owner, minlength=n) / len(owner)
    picked = np.bincount(chosen, minlength=n) / len(chosen)
    est = true if method == "oracle" else (picked if est is None else est)
    return {"rows": int(len(rows)), "selection_acc": float((chosen == owner).mean()),
            "supervision_acc": float((pred == d["gold"][rows]).mean()),
            "recall": {t: float((chosen[owner == i] == i).mean()) if (owner == i).any() else None
                       for i, t in enumerate(teachers)},
            "share_estimate": {t: float(est[i]) for i, t in enumerate(teachers)},
            "true_share": {t: float(true[i]) for i, t in enumerate(teachers)}}


def sweep(dataset: str, d: dict, emb: np.ndarray) -> list[dict]:
    swept = list(d["space"].teachers).index(SWEPT[dataset])
    out = []
    for share in SHARES:
        rows = subsample(d["owner"], swept, share)
        for method in METHODS:
            t0 = time.perf_counter()
            r = measure(d, emb, rows, method)
            out.append({"share": share, "method": method, **r, "seconds": round(time.perf_counter() - t0, 2),
                        "student_acc": None, "per_teacher_acc": None})
            print(f"{dataset} share {share:.2f} {method}: selection {r['selection_acc']:.3f}, "
                  f"estimate {r['share_estimate']}", flush=True)
    return out


def student_piece(dataset: str, d: dict, share: float, method: str, work: Path, pieces: Pieces) -> dict:
    """One student trained by the engine on the subsampled pool's stored predictions (resumable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reproduce_resume import recipe

    name = f"{method}-share{share:.2f}"
    raw = json.loads(json.dumps(d["raw"]))
    raw["integration"] = STUDENT_METHODS[method]
    rec = recipe(raw, "student")
    if pieces.done(name, rec):
        return pieces.read(name)
    from muki_ray.stages.cache import stage_keys
    from muki_ray.config.schema import parse_config
    from muki_ray.core.manifest import finish_stage, is_current
    from muki_ray.run.pipeline import combine_stage, evaluate_stage, train_stage

    started = time.time()
    run_dir = work / dataset / name
    preds = run_dir / "predictions"
    if not (preds / "manifest.json").exists():
        rows = subsample(d["owner"], list(d["space"].teachers).index(SWEPT[dataset]), share)
        (preds / "data").mkdir(parents=True, exist_ok=True)
        table = pq.read_table(RESULTS / "runs" / dataset / "predictions" / "data.parquet")
        pq.write_table(table.take(pa.array(rows)), preds / "data" / "part-0.parquet")
        finish_stage(preds, config_hash=f"shares-{share}", inputs={}, rows=len(rows), started=started)
    raw["output_dir"] = str(run_dir)
    cfg = parse_config(raw)
    for stage, fn in (("targets", combine_stage), ("train", train_stage), ("evaluate", evaluate_stage)):
        if not is_current(run_dir / stage, *stage_keys(cfg, d["space"], run_dir, stage)):
            fn(cfg, d["space"], run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sup = json.loads((run_dir / "supervision.json").read_text())
    result = {"dataset": dataset, "share": share, "method": method, "student_acc": metrics["test_accuracy"],
              "per_teacher_acc": metrics["test_accuracy_per_teacher"], "selection_acc": sup["selection_accuracy"],
              "supervision_acc": sup["target_accuracy"], "per_teacher": sup.get("per_teacher")}
    pieces.write(name, rec, started, result)
    return pieces.read(name)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = result["datasets"]
    fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 3.8), squeeze=False)
    for ax, (dataset, r) in zip(axes[0], data.items()):
        for method in METHODS:
            pts = [(x["share"], x["selection_acc"]) for x in r["rows"] if x["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("logit")
        ax.set_xticks(SHARES, [f"{s:.0%}" for s in SHARES], fontsize=7)
        ax.set_xlabel(f"share of the pool owned by {SWEPT[dataset]}")
        ax.set_ylabel("selection accuracy")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict) -> None:
    write_atomic(RESULTS / "shares.json", result)
    plot(result, RESULTS / "shares.png")
    md = ["# Selection against each teacher's share of the pool", "",
          f"`python benchmarks/shares.py` (commit {result['commit']}; {result['hardware']}). One shared MC pass per "
          "dataset (the reproduction's `predictions` piece), subsampled with seed 0 so that the swept teacher owns "
          "each share; selection through the combiner's own math. Estimated share: the owners' model's for "
          "`share`, the share of the selections otherwise.", "", "![selection against share](shares.png)", ""]
    for dataset, r in result["datasets"].items():
        md += [f"## {dataset} (swept teacher: {SWEPT[dataset]})", "",
               "Teachers' own-part test accuracy: " + ", ".join(f"{t} {v:.3f}" for t, v in r["own_accuracy"].items())
               + ".", "", rows_table(r, SWEPT[dataset])]
        md += ["", "Goals:", ""] + [f"- {g}" for g in r["goals"]] + [""]
    (RESULTS / "shares.md").write_text("\n".join(md) + "\n")


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def rows_table(r: dict, swept: str) -> str:
    """Every (share, method) row of one dataset: selection, supervision, recall and estimated share, students."""
    teachers = list(r["own_accuracy"])
    md = ["| share | texts | method | selection | supervision | " + " | ".join(f"recall {t}" for t in teachers)
          + f" | est. share {swept} | student | " + " | ".join(f"student on {t}" for t in teachers) + " |",
          "|---" * (7 + 2 * len(teachers)) + "|"]
    for x in r["rows"]:
        md.append(f"| {x['share']:.0%} | {x['rows']} | {x['method']} | {_f(x['selection_acc'])} | "
                  f"{_f(x['supervision_acc'])} | " + " | ".join(_f(x["recall"][t]) for t in teachers)
                  + f" | {_f(x['share_estimate'][swept])} (true {_f(x['true_share'][swept])}) | "
                  f"{_f(x['student_acc'])} | "
                  + " | ".join(_f((x["per_teacher_acc"] or {}).get(t)) for t in teachers) + " |")
    return "\n".join(md)


def selection_by_share(r: dict, swept: str) -> str:
    """Selection accuracy of each method (rows) at each share of the swept teacher (columns)."""
    shares = list(dict.fromkeys(x["share"] for x in r["rows"]))
    acc = {(x["method"], x["share"]): x["selection_acc"] for x in r["rows"]}
    methods = list(dict.fromkeys(x["method"] for x in r["rows"]))
    md = [f"| {swept}'s share | " + " | ".join(f"{s:.0%}" for s in shares) + " |", "|---" * (1 + len(shares)) + "|"]
    md += [f"| {m} | " + " | ".join(_f(acc.get((m, s))) for s in shares) + " |" for m in methods]
    return "\n".join(md)


def render(result: dict) -> str:
    """The docs' tables for results/shares.json: per dataset, selection accuracy by method and share."""
    return "\n\n".join(f"**{d}** ({r['swept']} swept):\n\n" + selection_by_share(r, r["swept"])
                         for d, r in result["datasets"].items())


def goals(rows: list[dict], dataset: str) -> list[str]:
    """The issue's goals for a share-robust selection, judged on `share` (the candidate) and on
    `default` (the shipped recipe)."""
    by = {(x["share"], x["method"]): x for x in rows}
    out = []
    for cand in ("default", "share"):
        rivals = [m for m in ("paper", "default") if m != cand]
        gaps = [(s, by[(s, cand)]["selection_acc"] - max(by[(s, m)]["selection_acc"] for m in rivals)) for s in SHARES]
        worst = min(gaps, key=lambda g: g[1])
        out.append(f"`{cand}` selection ≥ max({', '.join(rivals)}) at every share: "
                   f"{'met' if worst[1] >= 0 else 'missed'} (smallest lead {worst[1] * 100:+.1f} pts, at {worst[0]:.0%})")
        if dataset == "bbc_news":
            low = min((by[(s, cand)]["selection_acc"], s) for s in SHARES)
            out.append(f"`{cand}` selection ≥ 0.90 at every share: {'met' if low[0] >= 0.9 else 'missed'} "
                       f"(lowest {low[0]:.3f}, at {low[1]:.0%})")
    errs = [(max(abs(x["share_estimate"][t] - x["true_share"][t]) for t in x["true_share"]), x["share"])
            for x in rows if x["method"] == "share" and x["selection_acc"] >= 0.8]
    if errs:
        e = max(errs)
        out.append(f"`share`'s estimated shares within 0.05 wherever its selection ≥ 0.8: "
                   f"{'met' if e[0] <= 0.05 else 'missed'} (largest error {e[0]:.3f}, at {e[1]:.0%})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", action="append", choices=list(SWEPT), help="default: every stored one")
    ap.add_argument("--work", type=Path, default=Path("runs/shares"))
    ap.add_argument("--students", default="", help="comma-separated shares to train students at (pieces)")
    ap.add_argument("--bbc-sizes", default="--pool 800 --teacher-texts 800",
                    help="the sizes BBC's predictions piece ran at")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    previous = json.loads((RESULTS / "shares.json").read_text()) if (RESULTS / "shares.json").exists() else {}
    result = {"commit": commit(), "hardware": hardware(), "seed": 0, "shares": list(SHARES),
              "datasets": previous.get("datasets", {})}
    for dataset in args.dataset or list(SWEPT):
        if not (RESULTS / "runs" / dataset / "predictions" / "data.parquet").exists():
            print(f"{dataset}: no stored predictions (run benchmarks/reproduce_resume.py first)")
            continue
        d = load(dataset, args.bbc_sizes.split() if dataset == "bbc_news" else [])
        emb = embeddings(dataset, d["texts"], args.work.resolve())
        calib = json.loads((RESULTS / "runs" / dataset / "predictions.json").read_text())["calibration"]
        rows = sweep(dataset, d, emb)
        if args.students:
            from muki_ray.core.cluster import connect
            from muki_ray.config.schema import parse_config

            connect(parse_config(d["raw"]).ray)
            pieces = Pieces(RESULTS / "runs" / "shares" / dataset, {"pool_rows": len(d["ids"])})
            for share in map(float, args.students.split(",")):
                for method in STUDENT_METHODS:
                    p = student_piece(dataset, d, share, method, args.work.resolve(), pieces)
                    row = next(x for x in rows if x["method"] == method and abs(x["share"] - share) < 1e-9) \
                        if share in SHARES else None
                    if row is None:
                        row = {"share": share, "method": method, **measure(
                            d, emb, subsample(d["owner"], list(d["space"].teachers).index(SWEPT[dataset]), share),
                            method), "student_acc": None, "per_teacher_acc": None}
                        rows.append(row)
                    row.update(student_acc=p["student_acc"], per_teacher_acc=p["per_teacher_acc"])
        rows.sort(key=lambda x: (x["share"], METHODS.index(x["method"])))
        result["datasets"][dataset] = {"own_accuracy": {c["teacher"]: c["own_accuracy"] for c in calib},
                                       "pool_rows": len(d["ids"]), "swept": SWEPT[dataset], "rows": rows,
                                       "goals": goals(rows, dataset)}
        write(result)
    print("\n".join(f"{ds}: " + "; ".join(r["goals"]) for ds, r in result["datasets"].items()))


if __name__ == "__main__":
    main()
