"""The combiner: teachers' prediction columns -> one uncertainty-weighted target per text, streamed.

`Combiner` is a plain batch callable (task-based `map_batches`); all the math is in integrate.py,
prototypes.py and refine.py. The targets stage streams RUN_DIR/predictions and never holds it:

1. only with `calibration`, `prototypes` or `refine`: selection scores (`select_scores`), from
   pool-wide statistics folded over per-block partials (moments, quantile sketches, prototype
   sums); refine's rounds are in refine_stage.py;
2. a fold for the pool mean of the raw margin weights and the supervision counters;
3. the targets, with weights scaled by that mean.

Output columns: id, text, target list[float] (|Y|, label-space order), weight, teacher (name),
scores list[float] (N), plus the strategy's extra `columns` (strategies.py): NAME__probs per
teacher ("teacher_probs", for `uhc`) and `gold` (for `supervised`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from muki_ray.data.sources import fold, io_map, list_column
from muki_ray.method.integrate import Calibration, entropy_scores, normalize_weights, quality_from_counts, selection_counts
from muki_ray.config.labels import LabelSpace
from muki_ray.method.owners import OwnerModel, cluster_histograms, clusters_for, fit_owners, row_keys, seed_clusters, \
    smallest_keys
from muki_ray.method.prototypes import _unit, assign_pass, kmeans, owner_weights, seed_responsibilities, teacher_scores
from muki_ray.method.stats import add
from muki_ray.method.strategies import STRATEGIES, integrate, strategy_scores
from muki_ray.core.stage import column, stage_class

log = logging.getLogger("muki_ray.stages.combiner")


def _stack(col: np.ndarray) -> np.ndarray:
    """Arrow list column as numpy (object array of arrays, or 2-D) -> (B, C) float64."""
    if col.dtype == object:
        return np.stack([np.asarray(x, dtype=np.float64) for x in col]) if len(col) else np.zeros((0, 0))
    return np.asarray(col, dtype=np.float64)


def teacher_arrays(batch: dict, space: LabelSpace) -> dict[str, list[np.ndarray]]:
    """Per-field lists over teachers, from a batch of prediction columns."""
    fields = {"probs": [], "logits": [], "mc_probs": [], "mc_score": []}
    for name in space.teachers:
        for f in fields:
            col = batch[column(name, f)]
            fields[f].append(np.asarray(col, dtype=np.float64) if f == "mc_score" else _stack(col))
    return fields


@dataclass(frozen=True)
class Combiner:
    """Ray Data batch function: predictions batch -> targets batch; `counts` -> its fold partial."""

    space: LabelSpace
    strategy: str
    temperature: float
    kd_temperature: float
    reweight: bool
    target_probs: str

    @classmethod
    def of(cls, space: LabelSpace, integ) -> "Combiner":
        return cls(space, integ.strategy, integ.temperature, integ.kd_temperature, integ.reweight, integ.target_probs)

    def integrated(self, batch: dict):
        arrays = teacher_arrays(batch, self.space)
        gold = self.space.encode(batch["label"]) if "label" in batch else None
        select = _stack(batch["select_scores"]) if "select_scores" in batch else None
        out = integrate(self.strategy, **arrays, positions=list(self.space.positions),
                        num_union=len(self.space), temperature=self.temperature,
                        kd_temperature=self.kd_temperature, reweight=self.reweight,
                        target_probs=self.target_probs, gold=gold, select_scores=select)
        return out, arrays, gold

    def __call__(self, batch: dict, mean: Optional[float] = None) -> dict:
        """Targets of a batch; `mean` (the pool's mean raw weight) scales the weights to mean 1."""
        out, _, gold = self.integrated(batch)
        weights = out.weights if mean is None else normalize_weights(out.weights, mean)
        result = {
            "id": batch["id"], "text": batch["text"],
            "target": list_column(out.targets),
            "weight": weights.astype(np.float32),
            "teacher": np.array([self.space.teachers[i] for i in out.teacher], dtype=object),
            "scores": list_column(out.scores),
        }
        extra = STRATEGIES[self.strategy].columns  # what the strategy's loss reads besides target and weight
        if "teacher_probs" in extra:
            for name in self.space.teachers:
                result[column(name, "probs")] = batch[column(name, "probs")]
        if "gold" in extra:
            result["gold"] = gold
        return result

    def counts(self, batch: dict) -> dict:
        """Fold partial: the raw weights' sum and, with gold labels, the supervision counters."""
        out, arrays, _ = self.integrated(batch)
        n = len(self.space.teachers)
        c = {"rows": len(out.weights), "weight": float(out.weights.sum()),
             "selected": np.bincount(out.teacher, minlength=n)}
        if "label" in batch:
            gold = self.space.encode(batch["label"])
            known = gold >= 0
            owns = self.space.owner_mask()[:, np.clip(gold, 0, None)].T & known[:, None]  # (B, N)
            picked = np.eye(n, dtype=bool)[out.teacher] & known[:, None]
            c.update(owned=owns.sum(0), picked=picked.sum(0), picked_ok=(picked & owns).sum(0))
            pos, n = list(self.space.positions), len(self.space)
            c.update(known=int(known.sum()),
                     target_ok=int(((out.targets.argmax(1) == gold) & known).sum()),
                     selected_ok=int((owns[np.arange(len(gold)), out.teacher] & known).sum()),
                     mc=selection_counts(np.stack(arrays["mc_score"], axis=1), arrays["probs"], pos, n, gold),
                     entropy=selection_counts(np.stack([entropy_scores(p) for p in arrays["probs"]], axis=1),
                                              arrays["probs"], pos, n, gold))
        return c


def selected_shares(counts: dict, teachers) -> dict:
    """Each teacher's share of the pool's selections (no gold needed)."""
    total = max(int(np.sum(counts["selected"])), 1)
    return {t: float(v) / total for t, v in zip(teachers, counts["selected"])}


def supervision(counts: dict, teachers) -> Optional[dict]:
    """Analysis only (gold labels never reach training here): how good are the targets?

    The run's own targets and teacher choice, per teacher its selection recall (of the texts it
    owns, the share it was chosen for) and precision (of the texts it was chosen for, the share
    it owns), plus hard selection by MC scores and by plain entropy side by side, so every run
    shows whether MC beats entropy on its data.
    """
    if "known" not in counts or not counts["known"]:
        return None
    k = counts["known"]

    def ratio(a, b):
        return float(a) / float(b) if b else None

    per_teacher = {t: {"recall": ratio(counts["picked_ok"][i], counts["owned"][i]),
                       "precision": ratio(counts["picked_ok"][i], counts["picked"][i]),
                       "true_share": float(counts["owned"][i]) / k}
                   for i, t in enumerate(teachers)}
    return {"rows": k, "target_accuracy": counts["target_ok"] / k, "selection_accuracy": counts["selected_ok"] / k,
            "per_teacher": per_teacher,
            "mc": quality_from_counts(counts["mc"]), "entropy": quality_from_counts(counts["entropy"])}


# ------------------------------------------------------------------ selection scores
@dataclass(frozen=True)
class SelectScores:
    """Ray Data batch function: add `select_scores` (B, N), the strategy's scores calibrated."""

    space: LabelSpace
    strategy: str
    calibration: Calibration

    def scores(self, batch: dict) -> np.ndarray:
        arrays = teacher_arrays(batch, self.space)
        return strategy_scores(self.strategy, arrays["probs"], arrays["mc_score"])

    def __call__(self, batch: dict) -> dict:
        batch["select_scores"] = list_column(self.calibration.apply(self.scores(batch)))
        return batch


def select_scores(preds_ds, space: LabelSpace, integration, embedding: Optional[tuple] = None):
    """predictions Dataset -> (the same rows plus `select_scores` (N,), shares). The scores are
    calibrated and/or prototype scores (the strategy's own scores when both are off); `shares`
    (N,) are the teachers' estimated shares of the pool with `calibration: share`, else None.
    Lazy, except the prototypes' embeddings, which are materialized once in the object store for
    their folds (k-means, owners).

    `embedding` (EmbeddingSpec, map_batches options) is given when `integration.prototypes` is on.
    """
    none = Calibration.fit("none", np.zeros((0, len(space.teachers))))
    cal = none
    if integration.calibration != "none":  # one fold for the per-teacher moments and sketches
        raw = SelectScores(space, integration.strategy, none)
        cal = fold(preds_ds, lambda b: Calibration.fit(integration.calibration, raw.scores(b)),
                   lambda a, b: a.merge(b))
    ds = preds_ds.map_batches(SelectScores(space, integration.strategy, cal), batch_format="numpy", **io_map())
    if integration.prototypes is None:
        return ds, None
    from muki_ray.stages.embedding import EmbeddingStage  # (here: a combine task imports no torch)

    spec, options = embedding
    emb = ds.map_batches(stage_class("embed", EmbeddingStage), fn_constructor_kwargs={"spec": spec},
                         batch_size=integration.prototypes.batch_size, batch_format="numpy", **options).materialize()
    owners = fit_owner_model(emb, space, integration.prototypes.iterations) \
        if integration.calibration == "share" else None
    if owners is not None:
        log.info("targets: estimated shares of the pool: %s",
                 ", ".join(f"{t} {v:.3f}" for t, v in zip(space.teachers, owners[0].shares)))
    protos = fit_prototypes(emb, space, integration.prototypes, integration.target_probs, owners)
    p = integration.prototypes
    shares = owners[0].shares if owners is not None else None

    def rescore(batch: dict) -> dict:
        batch["select_scores"] = list_column(teacher_scores(_unit(_stack(batch["embedding"])), protos,
                                                            list(space.positions), p.kappa))
        del batch["embedding"]
        return batch

    return emb.map_batches(rescore, batch_format="numpy", **io_map()), shares


def fit_owner_model(emb_ds, space: LabelSpace, iterations: int) -> tuple[OwnerModel, np.ndarray]:
    """The owners' latent-class model (`owners.py`) by folds over a materialized dataset with `id`,
    `embedding` and `select_scores` (pool ranks) columns: the streaming form of
    `owners.owner_posteriors` (same steps). Returns (model, cluster centers (K, D))."""
    def sample(b):
        return smallest_keys(row_keys(b["id"]), _unit(_stack(b["embedding"])))

    keys, rows = fold(emb_ds, sample, lambda a, b: smallest_keys(np.concatenate([a[0], b[0]]),
                                                                  np.concatenate([a[1], b[1]])))
    centers = seed_clusters(rows, clusters_for(len(space), emb_ds.count()))

    def one_pass(c, prev):
        return fold(emb_ds, lambda b: assign_pass(_unit(_stack(b["embedding"])), c, prev), add, ordered=True)

    centers = kmeans(one_pass, centers, iterations)
    hist = fold(emb_ds, lambda b: cluster_histograms((_unit(_stack(b["embedding"])) @ centers.T).argmax(axis=1),
                                                     _stack(b["select_scores"]), len(centers)), add)
    return fit_owners(hist), centers


def fit_prototypes(emb_ds, space: LabelSpace, p, target_probs: str,
                   owners: Optional[tuple[OwnerModel, np.ndarray]] = None) -> np.ndarray:
    """Label prototypes (Y, D) by folds over a materialized dataset with `embedding` and
    `select_scores` columns: the streaming form of `prototypes.prototype_scores` (same steps);
    `owners` (model, cluster centers) from `fit_owner_model` seeds them with owner posteriors
    (None: `owner_weights` of the standardized scores, equal shares)."""
    positions, n_union = list(space.positions), len(space)

    def dists(batch):
        arrays = teacher_arrays(batch, space)
        return arrays["mc_probs"] if target_probs == "mc_mean" else arrays["probs"]

    if owners is None:
        z = fold(emb_ds, lambda b: Calibration.fit("zscore", _stack(b["select_scores"])), lambda a, b: a.merge(b))

        def weights(b, emb):
            return owner_weights(z.apply(_stack(b["select_scores"])), p.tau)
    else:
        model, centers = owners

        def weights(b, emb):
            return model.posterior((emb @ centers.T).argmax(axis=1), _stack(b["select_scores"]))

    def seed_partial(b):
        emb = _unit(_stack(b["embedding"]))
        return seed_responsibilities(weights(b, emb), dists(b), positions, n_union).T @ emb

    seeds = fold(emb_ds, seed_partial, add, ordered=True)

    def one_pass(protos, prev):
        return fold(emb_ds, lambda b: assign_pass(_unit(_stack(b["embedding"])), protos, prev), add, ordered=True)

    return kmeans(one_pass, _unit(seeds), p.iterations)
