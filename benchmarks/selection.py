"""Teacher selection by each `integration` option (#12) against plain MC, on the reproduction's predictions.

No student is trained: this measures selection only, on all pool texts and on the low-margin
ones (the 30% with the smallest MC top-2 margin), through the same code the combiner runs
(`integrate.calibrate`, `EmbeddingStage` + `prototypes.prototype_scores`, default settings).
Needs the shared stages of `benchmarks/reproduce.py` for each dataset. Writes results/selection.{json,md}.

    python benchmarks/selection.py [--work runs/reproduce]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402
from reproduce import LOW_MARGIN  # noqa: E402
from shares import selection_scores  # noqa: E402

# option -> (calibration, prototypes on)
OPTIONS = {"mc": ("none", False), "zscore": ("zscore", False), "rank": ("rank", False),
           "prototypes": ("none", True), "rank+prototypes": ("rank", True), "share+prototypes": ("share", True)}


def measure(shared: Path) -> dict:
    import pyarrow.parquet as pq
    from transformers import AutoConfig

    from muki_ray.core.hf_folder import resolve_model_path
    from muki_ray.stages.embedding import EmbeddingSpec, EmbeddingStage
    from muki_ray.method.integrate import Calibration
    from muki_ray.method.owners import row_keys
    from muki_ray.method.prototypes import prototype_scores

    preds = pq.read_table(shared / "predictions" / "data").to_pydict()
    teachers = sorted({c.split("__")[0] for c in preds if c.endswith("__mc_score")},
                      key=lambda n: list(preds).index(f"{n}__mc_score"))
    labels = {n: list(AutoConfig.from_pretrained(shared / "prepare" / n).id2label.values()) for n in teachers}
    positions, start = [], 0
    for n in teachers:
        positions.append(np.arange(start, start + len(labels[n])))
        start += len(labels[n])
    owner = np.array([[g in labels[n] for n in teachers] for g in preds["label"]]).argmax(1)
    probs = [np.stack(preds[f"{n}__probs"]) for n in teachers]
    mc = np.stack([np.asarray(preds[f"{n}__mc_score"]) for n in teachers], axis=1)
    t0 = time.perf_counter()
    stage = EmbeddingStage(EmbeddingSpec(model_path=str(resolve_model_path("builtin:minilm-l6")), threads=2))
    texts = preds["text"]
    emb = np.concatenate([stage.embed(texts[i:i + 64]) for i in range(0, len(texts), 64)])
    embed_seconds = time.perf_counter() - t0
    scores, est = {}, None
    for name, (method, protos) in OPTIONS.items():
        if method == "share":  # the default recipe: the owners' model seeds the prototypes
            scores[name], est = selection_scores("default", emb, mc, probs, positions, start, row_keys(preds["id"]))
            continue
        cal = Calibration.fit(method, mc)
        scores[name] = prototype_scores(emb, cal.apply(mc), probs, positions, start) if protos else cal.apply(mc)
    res_shares = {n: float(v) for n, v in zip(teachers, est)}
    top2 = np.sort(mc, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    low = margin <= np.quantile(margin, LOW_MARGIN)
    res = {"rows": len(texts), "low_margin_rows": int(low.sum()), "teachers": teachers,
           "embedding_seconds": embed_seconds, "estimated_shares": res_shares,
           "true_shares": {n: float((owner == t).mean()) for t, n in enumerate(teachers)}}
    for name, s in scores.items():
        ok = s.argmax(1) == owner
        res[name] = {"all": float(ok.mean()), "low_margin": float(ok[low].mean()),
                     "recall_per_teacher": {n: float(ok[owner == t].mean()) for t, n in enumerate(teachers)}}
    return res


def table_rows(res: dict) -> list[tuple]:
    """Selection accuracy per dataset and option, on all pool texts and on the low-margin ones."""
    res = {d: r for d, r in res.items() if isinstance(r, dict)}  # the datasets (the JSON adds hardware, headline)
    first = next(iter(res.values()), {})
    options = [o for o, v in first.items() if isinstance(v, dict) and "all" in v]
    rows = [("dataset", "texts (low-margin)", *(f"{o} all / low" for o in options), "embedding pass s")]
    rows += [(d, f"{r['rows']} ({r['low_margin_rows']})",
              *(f"{r[o]['all']:.3f} / {r[o]['low_margin']:.3f}" for o in options),
              f"{r['embedding_seconds']:.1f}") for d, r in res.items()]
    return rows


def render(result: dict) -> str:
    """The docs' table for results/selection.json."""
    return markdown_table(table_rows(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/reproduce")
    args = ap.parse_args()
    res = {}
    for dataset in ("bbc_news", "20newsgroups"):
        shared = Path(args.work) / dataset / "shared"
        if (shared / "predictions" / "manifest.json").exists():
            res[dataset] = measure(shared)
            print(dataset, res[dataset], flush=True)
    rows = table_rows(res)
    headline = "; ".join(f"{d}: selection " + ", ".join(f"{o} {r[o]['all']:.3f}" for o in OPTIONS)
                         for d, r in res.items())
    write_results("selection", res, rows, headline)
    print(headline)


if __name__ == "__main__":
    main()
