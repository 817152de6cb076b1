"""Loading and saving Hugging Face `from_pretrained` folders, safely.

Models load with `trust_remote_code=False` unless the config says otherwise, and from
safetensors only: pickle (`.bin`/`.pt`) weights can run code on load, so they are refused
unless `allow_pickle: true` is set for that model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


class ModelLoadError(Exception):
    """A model folder that cannot be used; the message names the folder."""


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
    """AutoModelForSequenceClassification from a local folder, safetensors unless allow_pickle."""
    from transformers import AutoModelForSequenceClassification

    return _load(AutoModelForSequenceClassification, folder, trust_remote_code, allow_pickle, **kwargs)


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


def model_skeleton(folder, *, trust_remote_code: bool = False):
    """The classifier's modules on the meta device: its structure (dropout p's included), no weights
    read and no memory used, so every teacher can be checked before any work."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"{folder}: config failed to load: {_first_line(e)}") from e


def load_tokenizer(folder, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(folder), trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{folder}: tokenizer failed to load: {_first_line(e)}") from e


def save_atomic(model, tokenizer, folder, state_dict: Optional[dict] = None) -> Path:
    """save_pretrained into a temporary sibling, then rename: a crash never leaves half a folder.
    `state_dict`: the weights to write instead of the model's own (gathered ZeRO-3 shards)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
