"""Label prototypes: re-select the teacher of each text in an embedding space. Pure numpy.

Beyond the paper (issue #12). Why it should work: fine-tuned teachers are over-confident outside
their own labels, so one text's uncertainty picks the right teacher little better than chance
(BBC reproduction: 0.51). But the texts of one label sit together in a sentence-embedding space,
and over such a group the owning teacher's evidence wins even where single texts mislead. So:

1. standardize each teacher's scores over the pool (teachers of unequal strength and label count
   are not comparable raw: 20NG's comp teacher scores 0.41 on its own texts, rec 0.46 on others);
2. seed one prototype per union label from the teachers' soft evidence: text i gives label y
   (owned by teacher t) the weight softmax_t(z_i / tau) * p_t(y | x_i);
3. refine the prototypes with spherical k-means over the pool (each label keeps its identity);
4. score teacher t on text i by the probability mass of t's labels under softmax_y(cos(x_i, c_y) / kappa).

No gold label is read. Shapes: B texts, D embedding dims, N teachers, Y union labels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from muki_ray.integrate import standardize


def _softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=1, keepdims=True)


def _unit(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)


def seed_responsibilities(z: np.ndarray, dists: Sequence[np.ndarray], positions, num_union: int,
                          tau: float) -> np.ndarray:
    """z (B, N), dists[t] (B, C_t) -> (B, Y) label weights softmax_t(z / tau) * p_t(y); rows sum to 1."""
    w = _softmax(z / tau)
    out = np.zeros((z.shape[0], num_union))
    for t, (p, pos) in enumerate(zip(dists, positions)):
        out[:, pos] = w[:, [t]] * np.asarray(p)
    return out


def refine(emb: np.ndarray, resp: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means from seeded responsibilities.

    emb (B, D) unit rows, resp (B, Y) -> (prototypes (Y, D) unit rows, assignment (B,) label index).
    A label that loses every text keeps its last prototype rather than vanishing.
    """
    protos = _unit(resp.T @ emb)
    assign = np.full(emb.shape[0], -1)
    for _ in range(iterations):
        new = (emb @ protos.T).argmax(axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        sums = np.eye(protos.shape[0])[assign].T @ emb
        has = np.bincount(assign, minlength=protos.shape[0]) > 0
        protos = np.where(has[:, None], _unit(sums), protos)
    return protos, assign


def teacher_scores(emb: np.ndarray, protos: np.ndarray, positions, kappa: float) -> np.ndarray:
    """(B, D), (Y, D) -> (B, N) in [0, 1]: mass of each teacher's labels under softmax_y(cos / kappa)."""
    post = _softmax(emb @ protos.T / kappa)
    return np.stack([post[:, pos].sum(axis=1) for pos in positions], axis=1)


def prototype_scores(emb: np.ndarray, scores: np.ndarray, dists: Sequence[np.ndarray], positions,
                     num_union: int, *, tau: float = 1.0, kappa: float = 0.05,
                     iterations: int = 20) -> np.ndarray:
    """Teacher scores (B, N) from embeddings (B, D), uncertainty scores (B, N) and teacher dists.

    The result replaces the uncertainty scores in selection and re-weighting (higher = this
    teacher owns the text). An empty pool gives an empty (0, N) result.
    """
    if emb.shape[0] == 0:
        return np.zeros((0, len(positions)))
    emb = _unit(np.asarray(emb, dtype=np.float64))
    resp = seed_responsibilities(standardize(np.asarray(scores, dtype=np.float64)), dists, positions,
                                 num_union, tau)
    protos, _ = refine(emb, resp, iterations)
    return teacher_scores(emb, protos, positions, kappa)
