"""The warm start's head probe on Ray: the previous student's features of a sample of the targets,
then `head_probe.fit_head` on the driver, written as the union head the training workers copy.

The features are the input of the previous student's classification head (its label-sized linear
layer), read with a forward hook, so the probe works for any architecture transformers builds a
sequence-classification head for. The sample is the first `student.head_probe_rows` rows of the
targets: their buckets are ordered by a hash of the id, so the first rows are a uniform sample.
The driver holds that sample only (rows x hidden floats), never the pool.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from muki_ray.student.evaluate import ClassifierSpec, ClassifierStage
from muki_ray.student.head_probe import fit_head
from muki_ray.core.hf_folder import head_keys, label_names, weight_reader
from muki_ray.core.progress import advance, track
from muki_ray.core.stage import stage_class

log = logging.getLogger(__name__)


def head_tensors(folder, num_labels: int, trust_remote_code: bool = False) -> tuple[str, str | None]:
    """(weight name, bias name or None) of a classifier folder's label-sized linear layer."""
    heads = head_keys(folder, num_labels, trust_remote_code=trust_remote_code)
    with weight_reader(folder) as w:
        weights = [k for k in heads if k in w and len(w[k].get_shape()) == 2]
    if len(weights) != 1:
        raise ValueError(f"{folder}: expected one label-sized linear layer in the head, found {sorted(heads)}")
    weight = weights[0]
    bias = weight[: -len("weight")] + "bias"
    return weight, bias if bias in heads else None


@dataclass(frozen=True)
class FeatureSpec(ClassifierSpec):
    head_module: str = ""       # the module whose input is the feature (the head weight's owner)


class HeadFeatureStage(ClassifierStage):
    """Ray Data stage: {"text": (B,), ...} -> the same batch plus "features" (B,) of (H,) float32,
    the classification head's input (dropout off)."""

    outputs = ("features",)

    def setup(self) -> None:
        super().setup()
        self._seen: list[torch.Tensor] = []
        module = self.model.get_submodule(self.spec.head_module)
        module.register_forward_hook(lambda mod, args, out: self._seen.append(args[0].detach().float().cpu()))

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        self._seen.clear()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        self.predict([texts[i] for i in order])  # predict sorts again: the hook sees `order`'s batches in turn
        feats = torch.cat(self._seen).numpy() if self._seen else np.zeros((0, 0), np.float32)
        out = np.empty(len(texts), dtype=object)
        for j, i in enumerate(order):
            out[i] = feats[j]
        batch["features"] = out
        advance(self.spec.progress, len(texts))
        return batch


def probe_warm_head(targets_ds, *, init_from: str, labels: list[str], rows: int, out_path: Path, options: dict,
                    max_length: int, threads: int = 1, trust_remote_code: bool = False) -> dict:
    """Fit the union head of a warm start on the previous student's features; write it to
    `out_path` (safetensors, the head tensors under the model's own names). Returns the probe's
    report (head_probe.probe_report before and after, the rows, the tensors written)."""
    from safetensors.torch import save_file

    old = label_names(init_from)
    weight_name, bias_name = head_tensors(init_from, len(old), trust_remote_code)
    sample = targets_ds.select_columns(["text", "target", "weight"]).limit(rows)
    feats, targets, weights = [], [], []
    with track("warm start", rows, "texts") as counter:
        spec = FeatureSpec(init_from, max_length, 64, threads, trust_remote_code, progress=counter,
                           head_module=weight_name.rsplit(".", 1)[0])
        scored = sample.map_batches(stage_class("warm_start_features", HeadFeatureStage),
                                    fn_constructor_kwargs={"spec": spec}, batch_size=256, batch_format="numpy",
                                    **options)
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            feats += list(batch["features"])
            targets += list(batch["target"])
            weights += list(batch["weight"])
    feats = np.stack(feats) if feats else np.zeros((0, 0), np.float32)
    with weight_reader(init_from) as w:
        w_old = w[weight_name][:].float().numpy()
        b_old = w[bias_name][:].float().numpy() if bias_name else np.zeros(len(old), np.float32)
    index = {n: i for i, n in enumerate(old)}
    new_rows = np.array([n not in index for n in labels])
    w0 = np.zeros((len(labels), w_old.shape[1]), np.float32)
    b0 = np.zeros(len(labels), np.float32)
    for j, n in enumerate(labels):
        if n in index:
            w0[j], b0[j] = w_old[index[n]], b_old[index[n]]
    if not len(feats):
        feats = np.zeros((0, w_old.shape[1]), np.float32)
    fit = fit_head(feats, np.stack(targets) if targets else np.zeros((0, len(labels))),
                   np.asarray(weights, dtype=np.float64), w0, b0, new_rows)
    tensors = {weight_name: torch.from_numpy(fit.weight)}
    if bias_name:
        tensors[bias_name] = torch.from_numpy(fit.bias)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, out_path)
    report = {**fit.report, "tensors": sorted(tensors), "new_labels": [n for n, new in zip(labels, new_rows) if new]}
    b, a = report["before"], report["after"]
    log.info("warm start: head probe on %d rows (%d of new labels): new labels predicted on their rows %s -> %s",
             report["rows"], b["new_label_rows"], _pct(b["new_rows_on_new"]), _pct(a["new_rows_on_new"]))
    return report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"
