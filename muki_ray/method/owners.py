"""Which teacher owns each text, and how much of the pool each one owns: a latent-class EM over
clusters of the pool. Pure numpy.

Beyond the paper (issue #32). Per-teacher calibration (`rank`) compares each teacher with its own
scores over the pool, as if every teacher owned 1/N of it: a teacher owning 5% of the pool has
its own texts in its top 5% of ranks, but its foreign texts still cover ranks 0-0.95, so it wins
about half of the other teachers' texts. The shares π are what is missing, and the pool does not
show them in any one teacher's scores. This module estimates them jointly with the owners.

The model (a latent class model, Dawid & Skene 1979; EM on the class proportions as in Saerens
et al. 2002, with "which teacher owns it" as the class):

- the pool is cut into K fine clusters of its sentence embeddings (`kmeans` from `seed_clusters`),
  without looking at any score: the texts of one label sit together whatever their number;
- a cluster's owner o is drawn with probability π_o;
- teacher t's score on each text, as its pool rank cut into M equal-mass bins, is drawn from
  G_t^own if t = o and from G_t^foreign otherwise, independently across texts and teachers.

Then log P(o_c = t) = log π_t + Σ_m H[c, t, m] log λ_t(m) + const, with H the cluster's bin
counts and λ_t = G_t^own / G_t^foreign, and EM fits π and λ from H alone (K·N·M numbers, folded
from blocks). Why it holds across shares: nothing in it assumes an equal split, and a cluster's
evidence is the sum over its texts, so a teacher's small offset between its own and foreign
texts, lost in one over-confident text, decides a cluster of fifty. Clusters are the third view
that a model of the scores alone lacks: with two teachers, a latent two-class model of two score
variables is a rank-2 factorization of their joint histogram, which is not unique (measured on
synthetic pools: a 3% share read as 9%). λ_t is kept non-decreasing (a teacher scores its own
texts above others'), which rules out the mirrored solution. No gold label is read.

A text's owner posterior is its cluster's, tempered by its own evidence:
P(o = t | x) ∝ ((1 - ε) Q[c(x), t] + ε π_t) · λ_t(b_t(x)).

Shapes: B texts, D embedding dims, N teachers, K clusters, M bins, S sampled rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from muki_ray.method.prototypes import _unit, assign_pass, kmeans

BINS = 10            # equal-mass rank bins per teacher
PSEUDO = 0.5         # Dirichlet pseudo-count per bin (a bin no text falls in keeps a finite ratio)
ITERATIONS = 500
TOLERANCE = 1e-7     # stop when no share moves by more than this in one iteration
SMOOTH = 0.05        # ε: the share prior mixed into a cluster's owner posterior for its texts
SAMPLE = 16384       # rows of the pool the cluster seeds are drawn from (the smallest keys)


def clusters_for(num_union: int, rows: int) -> int:
    """K: four clusters per union label, at least 16 and at most 256, and at most rows / 8."""
    return int(max(1, min(max(4 * num_union, 16), 256, rows // 8)))


def owner_bins(ranks: np.ndarray, bins: int = BINS) -> np.ndarray:
    """(B, N) pool ranks in (0, 1) -> (B, N) int bin indices 0..bins-1 (equal mass)."""
    return np.clip((np.asarray(ranks, dtype=np.float64) * bins).astype(np.int64), 0, bins - 1)


def seed_clusters(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means++ seeds (k, D) from unit rows (S, D), deterministic for a given sample and seed."""
    rng = np.random.default_rng(seed)
    k = min(k, len(sample))
    centers = [sample[0]]
    d = 1.0 - sample @ sample[0]
    for _ in range(1, k):
        p = np.clip(d, 0.0, None)
        idx = int(rng.choice(len(sample), p=p / p.sum())) if p.sum() > 0 else int(rng.integers(len(sample)))
        centers.append(sample[idx])
        d = np.minimum(d, 1.0 - sample @ sample[idx])
    return np.stack(centers)


def cluster_histograms(assign: np.ndarray, ranks: np.ndarray, k: int, bins: int = BINS) -> np.ndarray:
    """(B,) cluster of each text, (B, N) ranks -> (K, N, M) bin counts; they add up over blocks."""
    b = owner_bins(ranks, bins)
    n = b.shape[1]
    h = np.zeros((k, n, bins))
    for t in range(n):
        np.add.at(h, (assign, t, b[:, t]), 1.0)
    return h


def _non_decreasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic (non-decreasing) fit of y (M,) by pool-adjacent-violators."""
    vals, wts, sizes = [], [], []
    for v, c in zip(y, w):
        vals.append(float(v)), wts.append(float(c)), sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            c2 = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / c2 if c2 > 0 else (vals[-2] + vals[-1]) / 2
            wts[-2], sizes[-2] = c2, sizes[-2] + sizes[-1]
            vals.pop(), wts.pop(), sizes.pop()
    return np.repeat(vals, sizes)


def _log_softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class OwnerModel:
    shares: np.ndarray     # (N,) π, each teacher's estimated share of the pool; sums to 1
    log_ratio: np.ndarray  # (N, M) log λ_t per rank bin, non-decreasing
    clusters: np.ndarray   # (K, N) Q: P(cluster c is owned by teacher t)
    iterations: int = 0

    def posterior(self, assign: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """(B,) clusters and (B, N) ranks -> (B, N) P(owner = t | text); rows sum to 1."""
        b = owner_bins(ranks, self.log_ratio.shape[1])
        prior = (1.0 - SMOOTH) * self.clusters[np.asarray(assign)] + SMOOTH * self.shares
        a = np.log(np.clip(prior, 1e-300, None)) + np.take_along_axis(self.log_ratio.T, b, axis=0)
        return np.exp(_log_softmax(a))

    @classmethod
    def equal(cls, n: int, k: int = 1, bins: int = BINS) -> "OwnerModel":
        """Equal shares and uninformative ratios: what an empty pool gives."""
        return cls(np.full(n, 1.0 / max(n, 1)), np.zeros((n, bins)), np.full((k, n), 1.0 / max(n, 1)))


def fit_owners(hist: np.ndarray, iterations: int = ITERATIONS, tolerance: float = TOLERANCE) -> OwnerModel:
    """EM for π, λ and the clusters' owners Q from (K, N, M) bin counts. Deterministic.

    Start: equal shares, log λ a linear ramp (a teacher's upper bins hold its own texts).
    E-step: log Q[c, t] = log π_t + Σ_m H[c, t, m] log λ_t(m), normalized over t.
    M-step: π_t = Σ_c |c| Q[c, t] / B; G^own_t, G^foreign_t = Σ_c Q (or 1 - Q) · H[c, t] + PSEUDO;
    log λ_t = log G^own_t - log G^foreign_t (each normalized), made non-decreasing.
    """
    h = np.asarray(hist, dtype=np.float64)
    k, n, bins = h.shape
    sizes = h[:, 0, :].sum(axis=1)  # texts per cluster (every teacher sees each text once)
    if n < 2 or sizes.sum() == 0:
        return OwnerModel.equal(n, k, bins)
    model = OwnerModel(np.full(n, 1.0 / n), np.tile(np.linspace(-1.0, 1.0, bins), (n, 1)), np.full((k, n), 1.0 / n))
    for it in range(1, iterations + 1):
        q = np.exp(_log_softmax(np.log(model.shares) + np.einsum("ktm,tm->kt", h, model.log_ratio)))
        own = np.einsum("kt,ktm->tm", q, h) + PSEUDO
        foreign = np.einsum("kt,ktm->tm", 1.0 - q, h) + PSEUDO
        log_ratio = np.log(own / own.sum(1, keepdims=True)) - np.log(foreign / foreign.sum(1, keepdims=True))
        log_ratio = np.stack([_non_decreasing(log_ratio[t], own[t] + foreign[t]) for t in range(n)])
        shares = np.clip((sizes[:, None] * q).sum(axis=0) / sizes.sum(), 1e-6, None)
        shares /= shares.sum()
        moved = float(np.abs(shares - model.shares).max())
        model = OwnerModel(shares, log_ratio, q, it)
        if moved < tolerance:
            break
    return model


def row_keys(ids) -> np.ndarray:
    """(B,) ids -> (B,) uint64 keys from their hash: which rows seed the clusters does not depend
    on how the pool is cut into blocks, nor on its order."""
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
                     for i in ids], dtype=np.uint64)


def smallest_keys(keys: np.ndarray, emb: np.ndarray, size: int = SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """The rows with the `size` smallest keys, in key order: (keys, emb). Folds over blocks:
    smallest_keys(concat(a, b)) of two partials is the partial of both."""
    order = np.argsort(keys, kind="stable")[:size]
    return keys[order], emb[order]


def owner_posteriors(emb: np.ndarray, ranks: np.ndarray, num_union: int, keys: Optional[np.ndarray] = None,
                     iterations: int = 20, seed: int = 0) -> tuple[np.ndarray, OwnerModel]:
    """In memory: unit embeddings (B, D), pool ranks (B, N) and row keys (B,) -> ((B, N) owner
    posteriors, model). Keys default to 0..B-1. The streaming form (`combiner.fit_owners`) folds
    the same steps over blocks: the seeds' sample, the k-means passes, the histograms.
    """
    emb = _unit(np.asarray(emb, dtype=np.float64))
    ranks = np.asarray(ranks, dtype=np.float64)
    if emb.shape[0] == 0:
        return np.zeros((0, ranks.shape[1])), OwnerModel.equal(ranks.shape[1])
    keys = np.arange(emb.shape[0], dtype=np.uint64) if keys is None else np.asarray(keys, dtype=np.uint64)
    k = clusters_for(num_union, emb.shape[0])
    centers = seed_clusters(smallest_keys(keys, emb)[1], k, seed)
    centers = kmeans(lambda c, prev: assign_pass(emb, c, prev), centers, iterations)
    assign = (emb @ centers.T).argmax(axis=1)
    model = fit_owners(cluster_histograms(assign, ranks, len(centers)))
    return model.posterior(assign, ranks), model
