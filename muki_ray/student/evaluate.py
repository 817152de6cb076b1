"""Evaluating a classifier folder on labeled texts: union accuracy and accuracy per teacher's part.

Test sets are scored by a Ray Data actor stage (`ClassifierStage`, on a GPU when the actor has
one), and the accuracies come from per-block counts folded on the driver.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from muki_ray.core.hardware import actor_device
from muki_ray.core.hf_folder import load_classifier, load_tokenizer
from muki_ray.data.sources import fold
from muki_ray.core.progress import advance, track
from muki_ray.method.stats import add
from muki_ray.core.stage import Stage, stage_class


def predict_proba(model_dir, texts: list[str], *, max_length: int = 128, batch_size: int = 64,
                  trust_remote_code: bool = False) -> tuple[np.ndarray, list[str]]:
    """(B,) texts -> (probs (B, |Y|), label names in head order) with a `from_pretrained` folder, in process."""
    stage = ClassifierStage(ClassifierSpec(str(model_dir), max_length, batch_size, 0, trust_remote_code))
    return stage.predict(texts), stage.names


@dataclass(frozen=True)
class ClassifierSpec:
    model_dir: str
    max_length: int
    batch_size: int
    threads: int                # torch threads on CPU (0: leave torch's default)
    trust_remote_code: bool
    progress: Optional[str] = None  # the stage's progress counter (progress.track)


class ClassifierStage(Stage):
    """Ray Data stage: {"text": (B,), ...} -> the same batch plus "probs" (B, |Y|) float32."""

    outputs = ("probs",)

    def setup(self) -> None:
        s = self.spec
        self.device = actor_device(s.threads) if s.threads else torch.device("cpu")
        self.tokenizer = load_tokenizer(s.model_dir, trust_remote_code=s.trust_remote_code)
        self.model = load_classifier(s.model_dir, trust_remote_code=s.trust_remote_code).to(self.device).eval()
        self.names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def __call__(self, batch: dict) -> dict:
        probs = self.predict([str(t) for t in batch["text"]])
        batch["probs"] = np.empty(len(probs), dtype=object)
        for i, row in enumerate(probs):
            batch["probs"][i] = row
        advance(self.spec.progress, len(probs))
        return batch

    def predict(self, texts: list[str]) -> np.ndarray:
        """(B,) texts -> (B, |Y|) probabilities, in input order (similar lengths share a forward)."""
        probs = np.zeros((len(texts), len(self.names)), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), self.spec.batch_size):
                idx = order[start:start + self.spec.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], truncation=True, max_length=self.spec.max_length,
                                     padding=True, return_tensors="pt").to(self.device)
                probs[idx] = self.model(**enc).logits.float().softmax(-1).cpu().numpy()
        return probs


def accuracy_counts(pred: np.ndarray, gold: np.ndarray, parts: dict[str, np.ndarray]) -> dict:
    """Counts behind `accuracy_report` for one block (they add up over blocks); gold -1 is ignored."""
    known = gold >= 0
    ok = (pred == gold) & known
    out = {"n": int(known.sum()), "ok": int(ok.sum())}
    for name, idx in parts.items():
        inpart = known & np.isin(gold, idx)
        out[f"n/{name}"], out[f"ok/{name}"] = int(inpart.sum()), int((ok & inpart).sum())
    return out


def report_from_counts(c: dict, parts, prefix: str = "") -> dict:
    def ratio(a, b):
        return float(a / b) if b else float("nan")

    return {f"{prefix}accuracy": ratio(c["ok"], c["n"]),
            f"{prefix}accuracy_per_teacher": {p: ratio(c[f"ok/{p}"], c[f"n/{p}"]) for p in parts}}


def accuracy_report(pred: np.ndarray, gold: np.ndarray, parts: dict[str, np.ndarray], prefix: str = "") -> dict:
    """pred/gold (B,) union indices (gold -1 ignored); parts: name -> union indices of that part."""
    return report_from_counts(accuracy_counts(pred, gold, parts), parts, prefix)


def evaluate_dataset(model_dir, ds, space, *, max_length: int = 128, prefix: str = "test_", options: dict,
                     threads: int = 1, trust_remote_code: bool = False, label: str = "evaluate",
                     groups: Optional[dict] = None) -> dict:
    """Accuracy of a classifier folder on a labeled Ray Dataset {text, label}, over the union and per
    teacher part (labels matched by name). `options`: the actor pool's map_batches options.
    `groups` (name -> union indices) adds `{prefix}accuracy_per_group`, e.g. a grown student's old
    and new labels."""
    names = load_classifier_names(model_dir)
    parts = {t: pos for t, pos in zip(space.teachers, space.positions)}
    extra = {f"group:{g}": np.asarray(idx, dtype=np.int64) for g, idx in (groups or {}).items()}

    def counts(batch: dict) -> dict:
        pred = space.encode(np.asarray(names)[np.stack(batch["probs"]).argmax(1)].tolist())
        return accuracy_counts(pred, space.encode(batch["label"]), {**parts, **extra})

    ds = ds.materialize()  # read once: its row count sizes the progress line
    with track(label, ds.count(), "texts") as counter:
        spec = ClassifierSpec(str(model_dir), max_length, 64, threads, trust_remote_code, progress=counter)
        scored = ds.map_batches(stage_class("evaluate", ClassifierStage), fn_constructor_kwargs={"spec": spec},
                                batch_size=256, batch_format="numpy", **options)
        c = fold(scored, counts, add)
    out = report_from_counts(c, parts, prefix)
    if groups:
        by_key = report_from_counts(c, extra)["accuracy_per_teacher"]
        out[f"{prefix}accuracy_per_group"] = {g: by_key[f"group:{g}"] for g in groups}
    return out


def load_classifier_names(model_dir) -> list[str]:
    """The label names of a classifier folder, in head order (read from its config only)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
