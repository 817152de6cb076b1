"""Candidate share-robust selections, measured on the share sweep's pools (issue #32's exploration).

Not the engine: numpy over the stored prediction passes of `benchmarks/shares.py` (BBC t1 swept,
20NG sci swept, the same seeded subsamples), to record what each idea gives before one becomes
the default. Per dataset:

- how well one text's MC score separates a teacher's own texts from the others' (AUROC, full pool),
  and how well the mean score over an embedding cluster does (clusters: k-means of the MiniLM
  embeddings, K as the owners' model picks it; a cluster's owner is its majority gold owner);
- selection accuracy at every share for:
  - `cluster_raw`: each text takes the teacher with the highest mean raw MC score over its cluster;
  - `cluster_raw+vmf`: a von Mises-Fisher mixture of the label prototypes whose mixing weights are
    fitted (EM), so a label absent from the pool loses its weight instead of keeping the texts
    nearest its prototype, seeded from `cluster_raw`'s posterior (softmax of the cluster means × 100);
  - `rank+vmf`: the same mixture seeded as the default seeds its prototypes (rank calibration);
  - `cluster_switch`: where a cluster's mean raw MC score picks one teacher by a margin over the next
    larger than SWITCH × the mean of the two teachers' interquartile ranges of the raw score over the
    pool, the cluster's texts take that teacher; elsewhere the default recipe (rank + prototypes) decides;
  and, for comparison, `paper` and `default` from `results/shares.json`.

    python benchmarks/selection_candidates.py [--work runs/shares]

Writes results/selection_candidates.{json,md}. No gold label enters a selection; gold only scores it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from reproduce_resume import write_atomic  # noqa: E402
from shares import SHARES, SWEPT, embeddings, load, subsample  # noqa: E402

SWITCH = 0.5  # cluster_switch: raw margin, in units of the teachers' pool IQR, above which raw decides
TEMP = 100.0   # softmax temperature on cluster-mean MC scores (they lie in [0, 1])
KAPPA = 0.05   # the prototypes' concentration, as in the engine
ROUNDS = 30    # EM rounds of the mixture


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random own score > a random foreign one), ties counted half (Mann-Whitney)."""
    both = np.concatenate([pos, neg])
    ranks = np.empty(len(both))
    order = both.argsort(kind="stable")
    ranks[order] = np.arange(1, len(both) + 1)
    for v in np.unique(both):  # mid-ranks for ties
        tie = both == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def clusters(emb: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(B,) cluster of each unit row: the owners' model's seeding and spherical k-means."""
    from muki_ray.method.owners import seed_clusters
    from muki_ray.method.prototypes import _unit, assign_pass, kmeans

    emb = _unit(emb)
    centers = seed_clusters(emb[np.random.default_rng(seed).permutation(len(emb))], k, seed)
    centers = kmeans(lambda c, prev: assign_pass(emb, c, prev), centers, 20)
    return (emb @ centers.T).argmax(axis=1)


def cluster_means(x: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """(B, N) scores -> (K, N) mean over each cluster (empty clusters: -inf, never chosen)."""
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, assign, x)
    counts = np.bincount(assign, minlength=k)[:, None]
    return np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)


def vmf_mixture(emb: np.ndarray, resp: np.ndarray) -> np.ndarray:
    """(B, Y) label responsibilities of a vMF mixture with fitted mixing weights, from seeds (B, Y)."""
    from muki_ray.method.prototypes import _softmax, _unit

    emb = _unit(emb)
    weights = resp.mean(axis=0) + 1e-12
    centers = _unit(resp.T @ emb)
    for _ in range(ROUNDS):
        r = _softmax(np.log(weights / weights.sum() + 1e-300) + emb @ centers.T / KAPPA)
        weights = r.mean(axis=0)
        centers = np.where((r.sum(axis=0) > 1e-9)[:, None], _unit(r.T @ emb), centers)
    return r


def cluster_switch(emb, mc, probs, positions, n_union) -> np.ndarray:
    """(B,) teacher of each text: the cluster's raw-MC winner where its margin is wide, else the default's."""
    from muki_ray.method.owners import clusters_for
    from muki_ray.method.prototypes import prototype_scores

    k = clusters_for(n_union, len(mc))
    assign = clusters(emb, k)
    means = np.nan_to_num(cluster_means(mc, assign, k), neginf=-1e9)
    order = np.argsort(-means, axis=1)
    top, second = order[:, 0], order[:, 1]
    margin = means[np.arange(k), top] - means[np.arange(k), second]
    iqr = np.subtract(*np.quantile(mc, [0.75, 0.25], axis=0))
    wide = margin > SWITCH * (iqr[top] + iqr[second]) / 2
    default = prototype_scores(emb, mc, probs, positions, n_union).argmax(axis=1)
    return np.where(wide[assign], top[assign], default)


def select(method: str, emb, mc, probs, positions, n_union) -> np.ndarray:
    """(B,) chosen teacher of each text by one candidate."""
    if method == "cluster_switch":
        return cluster_switch(emb, mc, probs, positions, n_union)
    from muki_ray.method.integrate import calibrate, standardize
    from muki_ray.method.owners import clusters_for
    from muki_ray.method.prototypes import _softmax, seed_responsibilities

    if method.startswith("cluster_raw"):
        k = clusters_for(n_union, len(mc))
        assign = clusters(emb, k)
        w = _softmax(TEMP * np.nan_to_num(cluster_means(mc, assign, k), neginf=-1e9))[assign]
    else:
        w = _softmax(standardize(calibrate(mc, "rank")))
    if method.endswith("+vmf"):
        r = vmf_mixture(emb, seed_responsibilities(w, probs, positions, n_union))
        w = np.stack([r[:, pos].sum(axis=1) for pos in positions], axis=1)
    return w.argmax(axis=1)


def separation(d: dict, emb: np.ndarray) -> dict:
    from muki_ray.method.owners import clusters_for

    owner, mc, n = d["owner"], d["mc"], d["mc"].shape[1]
    k = clusters_for(len(d["space"]), len(owner))
    assign = clusters(emb, k)
    sizes = np.bincount(assign, minlength=k)
    major = np.array([np.bincount(owner[assign == c], minlength=n).argmax() if sizes[c] else -1 for c in range(k)])
    means = cluster_means(mc, assign, k)
    full = sizes > 0
    out = {"clusters": int(k), "cluster_owner_purity": float(sum(
        np.bincount(owner[assign == c], minlength=n).max() for c in range(k) if sizes[c]) / len(owner))}
    for t, name in enumerate(d["space"].teachers):
        own = owner == t
        out[name] = {"text_auroc": auroc(mc[own, t], mc[~own, t]),
                     "cluster_auroc": auroc(means[full & (major == t), t], means[full & (major != t), t])}
    return out


def separation_table(sep: dict, teachers: list[str]) -> str:
    """AUROC of own against foreign texts by each teacher's MC score: one text, and the mean over a cluster."""
    md = ["| teacher | one text | mean over a cluster |", "|---|---|---|"]
    return "\n".join(md + [f"| {t} | {sep[t]['text_auroc']:.3f} | {sep[t]['cluster_auroc']:.3f} |" for t in teachers])


def selection_table(rows: dict, shares) -> str:
    """Selection accuracy of each candidate (rows) at each share of the swept teacher, and its minimum."""
    md = ["| method | " + " | ".join(f"{s:.0%}" for s in shares) + " | min |", "|---|" + "---|" * (len(shares) + 1)]
    return "\n".join(md + [f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {min(vals):.3f} |"
                            for m, vals in rows.items()])


def render(result: dict) -> str:
    """The docs' tables for results/selection_candidates.json: per dataset, separation and selection by share."""
    parts = []
    for dataset, r in result["datasets"].items():
        sep = r["separation"]
        teachers = [t for t, v in sep.items() if isinstance(v, dict)]
        parts += [f"**{dataset}** ({r['swept']} swept):", separation_table(sep, teachers),
                  selection_table(r["selection"], result["shares"])]
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/shares"), help="the share sweep's embedding cache")
    ap.add_argument("--bbc-sizes", default="--pool 800 --teacher-texts 800")
    args = ap.parse_args()
    sweep = json.loads((RESULTS / "shares.json").read_text())["datasets"]
    result = {"shares": list(SHARES), "temperature": TEMP, "kappa": KAPPA, "switch": SWITCH, "datasets": {}}
    lines = ["# Candidate share-robust selections", "",
             "Written by `benchmarks/selection_candidates.py` (numpy over the stored passes; the share sweep's "
             "pools). Selection accuracy: the chosen teacher owns the gold label.", ""]
    for dataset in SWEPT:
        if not (RESULTS / "runs" / dataset / "predictions" / "data.parquet").exists():
            continue
        d = load(dataset, args.bbc_sizes.split() if dataset == "bbc_news" else [])
        emb = embeddings(dataset, d["texts"], args.work.resolve())
        swept = list(d["space"].teachers).index(SWEPT[dataset])
        rows = {m: [] for m in ("cluster_raw", "cluster_raw+vmf", "rank+vmf", "cluster_switch")}
        for share in SHARES:
            idx = subsample(d["owner"], swept, share)
            for m in rows:
                chosen = select(m, emb[idx], d["mc"][idx], [p[idx] for p in d["probs"]],
                                list(d["space"].positions), len(d["space"]))
                rows[m].append(float((chosen == d["owner"][idx]).mean()))
        for m in ("paper", "default"):
            rows[m] = [next(r["selection_acc"] for r in sweep[dataset]["rows"]
                            if r["method"] == m and abs(r["share"] - s) < 1e-9) for s in SHARES]
        sep = separation(d, emb)
        result["datasets"][dataset] = {"swept": SWEPT[dataset], "separation": sep, "selection": rows}
        lines += [f"## {dataset} ({SWEPT[dataset]} swept)", "",
                  f"Separation of own from foreign texts by the MC score (AUROC; K = {sep['clusters']} clusters, "
                  f"owner purity {sep['cluster_owner_purity']:.3f}):", "",
                  separation_table(sep, list(d["space"].teachers)), "", selection_table(rows, SHARES), ""]
        print("\n".join(lines[-len(rows) - 3:]), flush=True)
    write_atomic(RESULTS / "selection_candidates.json", result)
    tmp = RESULTS / "selection_candidates.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(RESULTS / "selection_candidates.md")


if __name__ == "__main__":
    main()
