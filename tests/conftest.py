"""Shared fixtures: one Ray session, tiny randomly initialized HF models with their own tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, BertTokenizerFast, DistilBertConfig,
                          RobertaConfig)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # Ray Train notices a started or finished worker group sooner

# A tiny shared vocabulary: topic words so that tiny models can learn something.
WORDS = (
    "the a of and to in is it on for with as by this that market stock bank profit shares economy "
    "film music star award show actor band album game team match player goal win season cup "
    "election minister party vote government law computer software phone internet digital chip"
).split()


# Modules whose tests start a Ray of their own (a subprocess, a `ray start` head, the CLI) without the fixture.
OWN_RAY = {"test_bad_inputs.py", "test_cluster.py", "test_faults.py"}


def pytest_collection_modifyitems(config, items):
    """`ray`: a test that runs stages, actors, training or a cluster (the slow part of the suite);
    `pytest -m "not ray"` is the quick run: math, config, labels, data readers. The readers' tests
    take `ray_session` for Ray Data alone and stay unmarked."""
    for item in items:
        name = item.path.name
        if name in OWN_RAY or ("ray_session" in item.fixturenames and name != "test_data.py"):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def make_tiny_model(folder: Path, labels: list[str], arch: str = "bert", seed: int = 0,
                    hidden_dropout: float = 0.1, init_range: float = 0.02) -> Path:
    """Write a tiny random `from_pretrained` folder (config, safetensors weights, own tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    id2label = {i: n for i, n in enumerate(labels)}
    common = dict(num_labels=len(labels), id2label=id2label, label2id={n: i for i, n in id2label.items()},
                  initializer_range=init_range)
    # Each architecture gets its own vocabulary order, so tokenizers really differ.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = list(WORDS) if arch == "bert" else list(reversed(WORDS)) if arch == "roberta" else sorted(WORDS)
    vocab = specials + words
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary itself (`vocab_file=` would be silently ignored).
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert tok.convert_tokens_to_ids(words[0]) == len(specials), "tiny tokenizer lost its vocabulary"
    if arch == "bert":
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128,
                         hidden_dropout_prob=hidden_dropout, **common)
    elif arch == "roberta":
        cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=48, max_position_embeddings=130, pad_token_id=0,
                            type_vocab_size=1, hidden_dropout_prob=hidden_dropout, **common)
    elif arch == "distilbert":
        cfg = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                               max_position_embeddings=128, dropout=hidden_dropout,
                               seq_classif_dropout=hidden_dropout, pad_token_id=0, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Three heterogeneous tiny teachers and a tiny student base, written once per session."""
    root = tmp_path_factory.mktemp("models")
    return {
        "news": make_tiny_model(root / "news", ["business", "politics"], "bert", seed=1),
        "arts": make_tiny_model(root / "arts", ["entertainment", "sport", "tech"], "roberta", seed=2),
        "misc": make_tiny_model(root / "misc", ["tech", "science"], "distilbert", seed=3),
        "student": make_tiny_model(root / "student", ["a", "b"], "bert", seed=4),
    }
