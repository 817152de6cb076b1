"""The combiner stage: teachers' prediction columns -> one uncertainty-weighted target per text.

A plain callable applied with task-based `map_batches`; all the math is in integrate.py.
Output columns: id, text, target list[float] (|Y|, label-space order), weight, teacher (name),
scores list[float] (N), plus NAME__probs per teacher for `uhc` and `gold` for `supervised`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from muki_ray.data import list_column
from muki_ray.integrate import integrate, normalize_weights, selection_quality
from muki_ray.labels import LabelSpace
from muki_ray.teachers import column


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
    """Ray Data batch function: predictions batch -> targets batch (raw margin weights)."""

    space: LabelSpace
    strategy: str
    temperature: float
    kd_temperature: float
    reweight: bool
    target_probs: str

    def __call__(self, batch: dict) -> dict:
        arrays = teacher_arrays(batch, self.space)
        gold = self.space.encode(batch["label"]) if "label" in batch else None
        select = _stack(batch["select_scores"]) if "select_scores" in batch else None
        out = integrate(self.strategy, **arrays, positions=list(self.space.positions),
                        num_union=len(self.space), temperature=self.temperature,
                        kd_temperature=self.kd_temperature, reweight=self.reweight,
                        target_probs=self.target_probs, gold=gold, select_scores=select)
        result = {
            "id": batch["id"], "text": batch["text"],
            "target": list_column(out.targets),
            "weight": out.weights.astype(np.float32),
            "teacher": np.array([self.space.teachers[i] for i in out.teacher], dtype=object),
            "scores": list_column(out.scores),
        }
        if self.strategy == "uhc":
            for name in self.space.teachers:
                result[column(name, "probs")] = batch[column(name, "probs")]
        if self.strategy == "supervised":
            result["gold"] = gold
        return result


def scale_weights(batch: dict, mean: float) -> dict:
    batch["weight"] = normalize_weights(np.asarray(batch["weight"], dtype=np.float64), mean).astype(np.float32)
    return batch


def select_table(preds_ds, space: LabelSpace, integration, embedding: Optional[tuple] = None):
    """predictions Dataset -> Arrow table of the same rows plus `select_scores` (N,): calibrated
    and/or prototype scores (the strategy's own scores when both are off).

    Both need the whole pool, so the scores are computed on the driver: B x (N + D) floats in
    memory. `embedding` (EmbeddingSpec, map_batches options) is given when `integration.prototypes`
    is on; the embedding pass is then a Ray Data actor stage.
    """
    import pyarrow as pa

    from muki_ray.integrate import calibrate, strategy_scores

    ds = preds_ds
    if integration.prototypes is not None:
        from muki_ray.embedding import EmbeddingStage
        from muki_ray.teachers import stage_class

        spec, options = embedding
        ds = ds.map_batches(stage_class("embed", EmbeddingStage), fn_constructor_kwargs={"spec": spec},
                            batch_size=integration.prototypes.batch_size, batch_format="numpy", **options)
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    batch = table_arrays(table)
    arrays = teacher_arrays(batch, space)
    scores = calibrate(strategy_scores(integration.strategy, arrays["probs"], arrays["mc_score"]),
                       integration.calibration)
    if integration.prototypes is not None:
        from muki_ray.prototypes import prototype_scores

        cfg = integration.prototypes
        dists = arrays["mc_probs"] if integration.target_probs == "mc_mean" else arrays["probs"]
        scores = prototype_scores(_stack(batch["embedding"]), scores, dists, list(space.positions), len(space),
                                  tau=cfg.tau, kappa=cfg.kappa, iterations=cfg.iterations)
        table = table.drop(["embedding"])
    return with_select_scores(table, scores)


def table_arrays(table) -> dict[str, np.ndarray]:
    """Arrow table -> {column: numpy array} (list columns as object arrays)."""
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def with_select_scores(table, scores: np.ndarray):
    """Arrow table with its `select_scores` column set to `scores` (B, N)."""
    import pyarrow as pa

    if "select_scores" in table.column_names:
        table = table.drop(["select_scores"])
    return table.append_column(
        "select_scores", pa.array([row for row in scores.astype(np.float32)], type=pa.list_(pa.float32())))


def combine(preds_ds, space: LabelSpace, integration):
    """predictions Dataset -> targets Dataset; margins normalized to mean 1 over the whole pool."""
    ds = preds_ds.map_batches(
        Combiner(space, integration.strategy, integration.temperature, integration.kd_temperature,
                 integration.reweight, integration.target_probs),
        batch_format="numpy", batch_size=1024)
    if integration.reweight and integration.reweight_normalize:
        ds = ds.materialize()  # the pool mean needs every row before any weight is final
        mean = ds.mean("weight")
        ds = ds.map_batches(scale_weights, fn_kwargs={"mean": mean}, batch_format="numpy", batch_size=1024)
    return ds


def supervision_report(preds_table, targets_table, space: LabelSpace) -> Optional[dict]:
    """Analysis only (gold labels never reach training here): how good are the targets?

    Reports the run's own targets and teacher choice, plus hard selection by MC scores and by
    plain-entropy scores side by side, so every run shows whether MC beats entropy on its data.
    """
    if "label" not in preds_table.column_names:
        return None
    from muki_ray.integrate import entropy_scores

    batch = table_arrays(preds_table)
    arrays = teacher_arrays(batch, space)
    gold = space.encode(batch["label"])
    positions, n = list(space.positions), len(space)
    mc = np.stack(arrays["mc_score"], axis=1)
    ent = np.stack([entropy_scores(p) for p in arrays["probs"]], axis=1)

    by_id = {i: k for k, i in enumerate(targets_table.column("id").to_pylist())}
    order = np.array([by_id[i] for i in batch["id"]])
    targets = _stack(targets_table.column("target").to_numpy(zero_copy_only=False))[order]
    chosen = np.array([space.teachers.index(t) for t in targets_table.column("teacher").to_pylist()])[order]
    owns = space.owner_mask()[:, np.clip(gold, 0, None)].T  # (B, N)
    known = gold >= 0
    selected_ok = owns[np.arange(len(gold)), chosen]
    return {
        "rows": int(known.sum()),
        "target_accuracy": float((targets.argmax(1) == gold)[known].mean()),
        "selection_accuracy": float(selected_ok[known].mean()),
        "mc": selection_quality(mc, arrays["probs"], positions, n, gold),
        "entropy": selection_quality(ent, arrays["probs"], positions, n, gold),
    }
