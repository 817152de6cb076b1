"""Monte-Carlo Dropout for a Hugging Face sequence classifier (MUKI step 1). Pure torch.

For each row: one deterministic pass (dropout off) and K stochastic passes in which ONLY the
`nn.Dropout` modules are in train mode, everything under `torch.inference_mode()`.

Which dropout is sampled: in transformers 5, BERT-style attention (BERT, RoBERTa, DistilBERT,
MPNet, ...) applies attention-probability dropout as `dropout=0.0 if not self.training`, i.e. it
follows the *attention module's* flag, which stays False here. So the K passes sample the hidden
dropout only - embeddings, attention output, FFN output and the classifier head - which is the
reference setting (hidden dropout p = 0.1). An `mc.dropout` override sets `p` on every dropout
module for the K passes only, and restores it after; the model's config is never edited.

The K samples run as one batched forward over B*K rows (each row repeated K times), chunked to
`max_batch_tokens` tokens. Masks are seeded: the same inputs, seed and chunking give the same p̄.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class MCOutput:
    """Per-row MC-Dropout results; C = the teacher's label count, all float32."""

    logits: torch.Tensor            # (B, C) deterministic logits
    probs: torch.Tensor             # (B, C) softmax(logits)
    entropy: torch.Tensor           # (B,) H(probs), nats
    mc_probs: torch.Tensor          # (B, C) p̄ = mean_k softmax(f(x; W_k))
    mc_uncertainty: torch.Tensor    # (B,) H(p̄), nats
    mc_score: torch.Tensor          # (B,) s = 1 - H(p̄) / log C, in [0, 1]
    sample_probs: Optional[torch.Tensor] = None  # (B, K, C) per-pass softmax, if requested


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -Σ p log p over the last dim, nats; 0·log 0 = 0. (..., C) -> (...)."""
    p = p.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def normalized_score(h: torch.Tensor, num_labels: int) -> torch.Tensor:
    """s = 1 - H / log C in [0, 1]; undefined (ValueError) for a single-label teacher."""
    if num_labels < 2:
        raise ValueError(f"a teacher with {num_labels} label(s) has no usable uncertainty (log C = 0)")
    return (1.0 - h / math.log(num_labels)).clamp(0.0, 1.0)


@contextlib.contextmanager
def dropout_sampling(model: nn.Module, p: Optional[float] = None) -> Iterator[list[nn.Module]]:
    """Put only the dropout modules in train mode (optionally at probability p); restore after."""
    saved = [(m, m.training, getattr(m, "p", None)) for m in model.modules()]
    drops = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    try:
        model.eval()
        for m in drops:
            m.train()
            if p is not None:
                m.p = float(p)
        yield drops
    finally:
        for m, training, old_p in saved:
            m.training = training
            if isinstance(m, DROPOUT_TYPES) and old_p is not None:
                m.p = old_p


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def _logits(model: nn.Module, batch: dict, autocast_dtype: Optional[torch.dtype]) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model(**batch).logits.float()


def mc_predict(model: nn.Module, batch: dict[str, torch.Tensor], *, samples: int, dropout: Optional[float] = None,
               seed: int = 0, max_batch_tokens: int = 65536, return_samples: bool = False,
               autocast_dtype: Optional[torch.dtype] = None) -> MCOutput:
    """Deterministic and MC-Dropout predictions for a tokenized batch.

    batch: {input_ids (B, L), attention_mask (B, L), [token_type_ids (B, L)]} on the model's device.
    samples: K >= 1. dropout: p for the K passes (None: each module's own p).
    max_batch_tokens: at most this many rows*L tokens per forward of the B*K sampled rows.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    b, length = batch["input_ids"].shape
    with torch.inference_mode():
        with eval_mode(model):
            logits = _logits(model, batch, autocast_dtype)
        c = logits.shape[-1]
        probs = logits.softmax(-1)

        # One batched forward of B*K rows: row i's K copies are adjacent (repeat_interleave).
        rows = max(1, max_batch_tokens // max(1, length))
        expanded = {k: v.repeat_interleave(samples, dim=0) for k, v in batch.items()}
        chunks = []
        with torch.random.fork_rng(devices=_cuda_devices(logits)), dropout_sampling(model, dropout):
            torch.manual_seed(seed)
            for start in range(0, b * samples, rows):
                part = {k: v[start:start + rows] for k, v in expanded.items()}
                chunks.append(_logits(model, part, autocast_dtype).softmax(-1))
        sample_probs = torch.cat(chunks).view(b, samples, c)
        mc_probs = sample_probs.mean(1)
        h_mc = entropy(mc_probs)
        return MCOutput(
            logits=logits, probs=probs, entropy=entropy(probs), mc_probs=mc_probs, mc_uncertainty=h_mc,
            mc_score=normalized_score(h_mc, c), sample_probs=sample_probs if return_samples else None)


def _cuda_devices(t: torch.Tensor) -> list:
    return [t.device] if t.device.type == "cuda" else []
