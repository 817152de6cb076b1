"""Evaluating a classifier folder on labeled texts: union accuracy and accuracy per teacher's part."""

from __future__ import annotations

from typing import Optional

import numpy as np


def predict_proba(model_dir, texts: list[str], *, max_length: int = 128, batch_size: int = 64,
                  trust_remote_code: bool = False) -> tuple[np.ndarray, list[str]]:
    """(B,) texts -> (probs (B, |Y|), label names in head order) with a `from_pretrained` folder."""
    import torch

    from muki_ray.hf_folder import load_classifier, load_tokenizer

    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_classifier(model_dir, trust_remote_code=trust_remote_code).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch
    probs = np.zeros((len(texts), len(names)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            probs[idx] = model(**enc).logits.float().softmax(-1).numpy()
    return probs, names


def accuracy_report(pred: np.ndarray, gold: np.ndarray, parts: dict[str, np.ndarray],
                    prefix: str = "") -> dict:
    """pred/gold (B,) union indices (gold -1 ignored); parts: name -> union indices of that part."""
    known = gold >= 0
    out = {f"{prefix}accuracy": float((pred == gold)[known].mean()) if known.any() else float("nan")}
    per = {}
    for name, idx in parts.items():
        inpart = known & np.isin(gold, idx)
        per[name] = float((pred == gold)[inpart].mean()) if inpart.any() else float("nan")
    out[f"{prefix}accuracy_per_teacher"] = per
    return out


def evaluate_folder(model_dir, texts: list[str], gold_names: list[str], space, max_length: int = 128,
                    prefix: str = "test_") -> dict:
    """Accuracy of a student folder over the union and per teacher part (by label name)."""
    probs, names = predict_proba(model_dir, texts, max_length=max_length)
    pred_names = np.array(names)[probs.argmax(1)]
    pred = space.encode(pred_names.tolist())
    gold = space.encode(gold_names)
    parts = {t: pos for t, pos in zip(space.teachers, space.positions)}
    return accuracy_report(pred, gold, parts, prefix=prefix)
