"""Label prototypes: re-select the teacher of each text in an embedding space. Pure numpy.

Beyond the paper (issue #12). Why it should work: fine-tuned teachers are over-confident outside
their own labels, so one text's uncertainty picks the right teacher little better than chance
(BBC reproduction: 0.51). But the texts of one label sit together in a sentence-embedding space,
and over such a group the owning teacher's evidence wins even where single texts mislead. So:

1. standardize each teacher's scores over the pool (teachers of unequal strength and label count
   are not comparable raw: 20NG's comp teacher scores 0.41 on its own texts, rec 0.46 on others);
2. seed one prototype per union label from the teachers' soft evidence: text i gives label y
   (owned by teacher t) the weight w_t(x_i) * p_t(y | x_i), with w = softmax_t(z_i / tau), or with
   `calibration: share` the owner posteriors of `owners.py`, which know each teacher's share;
3. refine the prototypes with spherical k-means over the pool (each label keeps its identity);
4. score teacher t on text i by the probability mass of t's labels under softmax_y(cos(x_i, c_y) / kappa).

No gold label is read. Shapes: B texts, D embedding dims, N teachers, Y union labels.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from muki_ray.method.integrate import standardize


def _softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=1, keepdims=True)


def _unit(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)


def owner_weights(z: np.ndarray, tau: float) -> np.ndarray:
    """(B, N) standardized scores -> (B, N) softmax_t(z / tau): each text's weight per owner when
    the teachers' shares are not estimated (equal shares: z is standardized per teacher)."""
    return _softmax(z / tau)


def seed_responsibilities(w: np.ndarray, dists: Sequence[np.ndarray], positions, num_union: int) -> np.ndarray:
    """w (B, N) owner weights (rows sum to 1), dists[t] (B, C_t) -> (B, Y) label weights
    w_t * p_t(y); rows sum to 1. The weights are `owner_weights` or, with `calibration: share`,
    the owner posteriors of `owners.py` (which carry the estimated shares of the pool).

    A label owned by several teachers collects the weight of each of them.
    """
    out = np.zeros((w.shape[0], num_union))
    for t, (p, pos) in enumerate(zip(dists, positions)):
        out[:, pos] += w[:, [t]] * np.asarray(p)
    return out


def assign_pass(emb: np.ndarray, protos: np.ndarray, prev: Optional[np.ndarray]) -> tuple:
    """One k-means pass over a block: emb (B, D) unit rows, protos (Y, D).

    Returns (sums (Y, D) of the rows assigned to each label, counts (Y,), changed: rows whose
    label differs from their label under `prev` (0 when prev is None)). Sums add up over blocks.
    """
    assign = (emb @ protos.T).argmax(axis=1)
    sums = np.zeros_like(protos)
    np.add.at(sums, assign, emb)
    counts = np.bincount(assign, minlength=protos.shape[0])
    changed = 0 if prev is None else int((assign != (emb @ prev.T).argmax(axis=1)).sum())
    return sums, counts, changed


def kmeans(run_pass: Callable, protos: np.ndarray, iterations: int) -> np.ndarray:
    """Spherical k-means from initial prototypes (Y, D); each label keeps its identity.

    run_pass(protos, prev) -> `assign_pass`'s (sums, counts, changed) over the whole pool, in
    memory or as a streaming fold. Stops when no row changes label. A label that loses every
    text keeps its last prototype rather than vanishing.
    """
    prev = None
    for _ in range(iterations):
        sums, counts, changed = run_pass(protos, prev)
        if prev is not None and changed == 0:
            break
        prev, protos = protos, np.where((counts > 0)[:, None], _unit(sums), protos)
    return protos


def refine(emb: np.ndarray, resp: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means in memory: emb (B, D) unit rows, resp (B, Y) seeds -> (prototypes (Y, D),
    assignment (B,) label index)."""
    protos = kmeans(lambda p, prev: assign_pass(emb, p, prev), _unit(resp.T @ emb), iterations)
    return protos, (emb @ protos.T).argmax(axis=1)


def teacher_scores(emb: np.ndarray, protos: np.ndarray, positions, kappa: float) -> np.ndarray:
    """(B, D), (Y, D) -> (B, N) in [0, 1]: mass of each teacher's labels under softmax_y(cos / kappa)."""
    post = _softmax(emb @ protos.T / kappa)
    return np.stack([post[:, pos].sum(axis=1) for pos in positions], axis=1)


def prototype_scores(emb: np.ndarray, scores: np.ndarray, dists: Sequence[np.ndarray], positions,
                     num_union: int, *, tau: float = 1.0, kappa: float = 0.05,
                     iterations: int = 20, owners: Optional[np.ndarray] = None) -> np.ndarray:
    """Teacher scores (B, N) from embeddings (B, D), uncertainty scores (B, N) and teacher dists.

    `owners` (B, N): owner posteriors to seed from (`owners.owner_posteriors`); None seeds from
    `owner_weights` of the standardized scores. The result replaces the uncertainty scores in
    selection and re-weighting (higher = this teacher owns the text). An empty pool gives an
    empty (0, N) result.
    """
    if emb.shape[0] == 0:
        return np.zeros((0, len(positions)))
    emb = _unit(np.asarray(emb, dtype=np.float64))
    w = owners if owners is not None else owner_weights(standardize(np.asarray(scores, dtype=np.float64)), tau)
    protos, _ = refine(emb, seed_responsibilities(w, dists, positions, num_union), iterations)
    return teacher_scores(emb, protos, positions, kappa)
