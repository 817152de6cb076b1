"""`integration.refine`'s rounds over the pool, streamed; the math is in refine.py.

Per round: a fold sketches the pool's top-2 margins and gives the cut m* (`refine.margin_cut`);
the rows at or above it train a first student (Ray Train + DeepSpeed, the student's model and
settings), exported to TARGETS/refine/round<r>/; an actor stage (`Judge`) runs it over the rows
below the cut only and mixes its teacher masses into their scores (`refine.refine_scores`); a
fold counts what changed. The first student never judges a text it was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muki_ray.stages.combiner import Combiner, _stack, teacher_arrays
from muki_ray.core.hf_folder import resolve_model_path
from muki_ray.data.sources import fold, io_map, list_column
from muki_ray.student.evaluate import ClassifierSpec, ClassifierStage
from muki_ray.core.hardware import gpu_default
from muki_ray.method.integrate import margin_weights, selection_counts
from muki_ray.method.refine import high_margin, margin_cut, refine_scores, teacher_mass
from muki_ray.method.stats import Sketch, add
from muki_ray.method.strategies import STRATEGIES
from muki_ray.student.training import tokenize, train_classifier
from muki_ray.core.stage import stage_class, stage_options

log = logging.getLogger("muki_ray.method.refine")


class Judge(ClassifierStage):
    """Ray Data stage: rows below the cut get the first student's teacher masses mixed
    into their `select_scores`; `judged` and `before` (the old choice) are kept for the round's fold."""

    inputs = ("text", "select_scores")
    outputs = ("select_scores", "judged", "before")

    def __init__(self, spec: ClassifierSpec, cut: float, positions: list, temperature: float, student_weight: float):
        self.cut, self.positions = cut, [np.asarray(p) for p in positions]
        self.temperature, self.student_weight = temperature, student_weight
        super().__init__(spec)

    def __call__(self, batch: dict) -> dict:
        scores = _stack(batch["select_scores"])
        judged = ~high_margin(scores, self.cut) if len(scores) else np.zeros(0, dtype=bool)
        mass = teacher_mass(self.predict([str(t) for t, j in zip(batch["text"], judged) if j]), self.positions) \
            if judged.any() else np.zeros((0, len(self.positions)))
        refined = refine_scores(scores, mass, judged, temperature=self.temperature,
                                student_weight=self.student_weight) if len(scores) else scores
        batch["before"] = scores.argmax(1) if len(scores) else np.zeros(0, dtype=np.int64)
        batch["judged"] = judged
        batch["select_scores"] = list_column(refined)
        return batch


@dataclass(frozen=True)
class RoundCounts:
    """Fold partial of a judged round: judged rows, changed choices, judged selection with gold."""

    space: object

    def __call__(self, batch: dict) -> dict:
        judged = np.asarray(batch["judged"], dtype=bool)
        after = _stack(batch["select_scores"])
        c = {"judged": int(judged.sum()),
             "changed": int(((after.argmax(1) if len(after) else after) != batch["before"])[judged].sum())}
        if "label" in batch and judged.any():
            gold = self.space.encode(batch["label"])[judged]
            probs = [p[judged] for p in teacher_arrays(batch, self.space)["probs"]]
            pos, n = list(self.space.positions), len(self.space)
            before = np.eye(len(pos))[batch["before"][judged]]  # one-hot scores: the old choice
            c["before_counts"] = selection_counts(before, probs, pos, n, gold)
            c["after_counts"] = selection_counts(after[judged], probs, pos, n, gold)
        return c


def _rows_from(batch: dict, cut: float) -> dict:
    """The rows of a batch whose top-2 margin reaches `cut` (the first student's training rows)."""
    keep = high_margin(_stack(batch["select_scores"]), cut) if len(batch["id"]) else np.zeros(0, dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def self_train(cfg, space, run_dir: Path, stage_dir: Path, ds, dev_ds, name: str):
    """`integration.refine` on a dataset with `select_scores` -> (refined dataset, per-round stats).

    The stats' selection accuracies need pool gold labels (analysis only).
    """
    integ, r_cfg, s = cfg.integration, cfg.integration.refine, cfg.student
    hyper = s.model_copy(update={"epochs": r_cfg.epochs}) if r_cfg.epochs else s
    model_path = str(resolve_model_path(s.model))
    combiner = Combiner.of(space, integ)
    stats = []
    for r in range(1, r_cfg.rounds + 1):
        margins = fold(ds, lambda b: Sketch(margin_weights(_stack(b["select_scores"]))), lambda a, b: a.merge(b))
        cut = margin_cut(margins, r_cfg.fraction)
        high = ds.map_batches(_rows_from, fn_kwargs={"cut": cut}, batch_format="numpy", **io_map())
        counts = fold(high, combiner.counts, add)
        trained = counts["rows"]
        if trained >= margins.n:
            break  # nothing left to judge
        train_ds = high.map_batches(combiner, fn_kwargs={"mean": counts["weight"] / max(trained, 1)},
                                    batch_format="numpy", **io_map()).select_columns(["text", "target", "weight"])
        first = stage_dir / "refine" / f"round{r}"
        metrics = train_classifier(
            hyper, model_path=model_path, labels=list(space.names), loss=STRATEGIES[integ.strategy].loss,
            train_ds=tokenize(train_ds, model_path, s.max_length, s.trust_remote_code), dev_ds=dev_ds,
            rows=trained, run_dir=run_dir, name=f"refine{r}-{name}", out_dir=first, progress=f"targets: refine {r}",
            parts={t: p.tolist() for t, p in zip(space.teachers, space.positions)},
            trust_remote_code=s.trust_remote_code, allow_pickle=s.allow_pickle, storage_path=cfg.ray.storage_path,
            loss_context={"kd_temperature": integ.kd_temperature})
        spec = ClassifierSpec(str(first), s.max_length, r_cfg.batch_size, r_cfg.resources.actor_threads,
                              s.trust_remote_code)
        judged = ds.map_batches(stage_class("first_student", Judge), fn_constructor_kwargs={
            "spec": spec, "cut": cut, "positions": [p.tolist() for p in space.positions],
            "temperature": integ.temperature, "student_weight": r_cfg.student_weight},
            batch_size=r_cfg.batch_size, batch_format="numpy",
            **stage_options(r_cfg.resources, gpu_default(cfg.ray.autoscaling))).materialize()
        c = fold(judged, RoundCounts(space), add)
        stat = {"round": r, "trained_rows": trained, "judged_rows": c["judged"], "changed": c["changed"],
                "first_student_dev_accuracy": metrics["dev_accuracy"]}
        if "before_counts" in c:  # analysis only: how often the judged rows get their owning teacher
            for key in ("before", "after"):
                k = c[f"{key}_counts"]
                stat[f"judged_selection_accuracy_{key}"] = k["selected_ok"] / k["rows"] if k["rows"] else float("nan")
        log.info("refine round %d: first student on %d texts (dev acc %.3f) judged %d, %d changed teacher%s", r,
                 trained, metrics["dev_accuracy"] or float("nan"), stat["judged_rows"], stat["changed"],
                 "" if "before_counts" not in c else f"; judged selection acc "
                 f"{stat['judged_selection_accuracy_before']:.3f} -> {stat['judged_selection_accuracy_after']:.3f}")
        stats.append(stat)
        ds = judged.drop_columns(["judged", "before"])
    return ds, stats
