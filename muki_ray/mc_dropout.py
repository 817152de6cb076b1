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

Two cheaper estimates, both off by default because they change p̄:
- `layers=N`: the lower layers run once, deterministically (their output is captured during the
  deterministic pass); only the top N layers and the head are sampled K times.
- `adaptive`: sample in rounds and stop a row once its score is pinned (see `score_halfwidth`).
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
    samples_used: Optional[torch.Tensor] = None  # (B,) int64 passes run per row (< K where adaptive stopped)


@dataclass(frozen=True)
class AdaptiveK:
    """Stop sampling a row once more passes cannot move its score by more than `tolerance`.

    tolerance: ε in score units (s in [0, 1]); two teachers whose final scores differ by more than
    2ε keep their order. round: passes per round (the first check comes after one round).
    z: normal quantile of the bound (2.58: two-sided 99%).
    """

    tolerance: float = 0.02
    round: int = 4
    z: float = 2.58


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


def score_halfwidth(mean: torch.Tensor, sq_mean: torch.Tensor, k: int, total: int, z: float) -> torch.Tensor:
    """Half-width of a z-interval for the final score s_K after k of K passes. (B, C), (B, C) -> (B,).

    mean, sq_mean: running means of p and p² over the k passes. The K-k passes still to come move p̄
    by (K-k)/K (q̄ - p̄_k), where q̄ is a mean of K-k i.i.d. draws with per-class std σ_c, so the
    move has std σ_c √(K-k) / K (σ_c estimated unbiasedly from the k passes; normal approximation).
    To first order |Δs| <= Σ_c |log p̄_c + 1| |Δp̄_c| / log C, and each |Δp̄_c| <= z σ_c √(K-k) / K.
    Returns 0 when k = K (nothing left to sample).
    """
    c = mean.shape[-1]
    if k >= total:
        return torch.zeros(mean.shape[:-1], dtype=mean.dtype, device=mean.device)
    var = (sq_mean - mean.square()).clamp_min(0.0) * (k / max(k - 1, 1))
    move = var.sqrt() * math.sqrt(total - k) / total
    grad = (mean.clamp_min(1e-6).log() + 1.0).abs()
    return z * (grad * move).sum(-1) / math.log(c)


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's layer stack (BERT/RoBERTa `encoder.layer`, DistilBERT `transformer.layer`, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"{type(model).__name__}: no layer stack of num_hidden_layers={n} modules, so "
                     f"mc.layers cannot split it; leave mc.layers unset for this teacher")


class _Skip(nn.Module):
    """Stands in for a lower layer whose output is replayed: returns its hidden-state input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def _capture_input(layer: nn.Module, into: list) -> Iterator[None]:
    def hook(module, args, kwargs):
        into.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _replay_lower(layers: nn.ModuleList, first: int, state: dict) -> Iterator[None]:
    """Layers below `first` are skipped; layer `first` gets `state["h"]` as its hidden states."""

    def hook(module, args, kwargs):
        if args:
            return (state["h"], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state["h"]}

    saved = [layers[i] for i in range(first)]
    handle = layers[first].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(first):
            layers[i] = _Skip()
        yield
    finally:
        handle.remove()
        for i, layer in enumerate(saved):
            layers[i] = layer


def _logits(model: nn.Module, batch: dict, autocast_dtype: Optional[torch.dtype]) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model(**batch).logits.float()


def mc_predict(model: nn.Module, batch: dict[str, torch.Tensor], *, samples: int, dropout: Optional[float] = None,
               seed: int = 0, max_batch_tokens: int = 65536, return_samples: bool = False,
               autocast_dtype: Optional[torch.dtype] = None, layers: Optional[int] = None,
               adaptive: Optional[AdaptiveK] = None) -> MCOutput:
    """Deterministic and MC-Dropout predictions for a tokenized batch.

    batch: {input_ids (B, L), attention_mask (B, L), [token_type_ids (B, L)]} on the model's device.
    samples: K >= 1. dropout: p for the K passes (None: each module's own p).
    max_batch_tokens: at most this many rows*L tokens per forward of the B*K sampled rows.
    layers: sample only the top N layers and the head (None: every layer and the embeddings).
    adaptive: stop rows early (None: every row gets K passes).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if adaptive is not None and return_samples:
        raise ValueError("return_samples needs every row's K passes; it cannot be combined with adaptive")
    b, length = batch["input_ids"].shape
    stack = transformer_layers(model) if layers is not None else None
    first = 0
    if stack is not None:
        if not 1 <= layers <= len(stack):
            raise ValueError(f"mc.layers must be in [1, {len(stack)}] for this model, got {layers}")
        first = len(stack) - layers
    with torch.inference_mode():
        lower: list = []
        with eval_mode(model), (_capture_input(stack[first], lower) if stack is not None
                                else contextlib.nullcontext()):
            logits = _logits(model, batch, autocast_dtype)
        c = logits.shape[-1]
        probs = logits.softmax(-1)

        per_round = samples if adaptive is None else min(adaptive.round, samples)
        total = torch.zeros(b, c, dtype=torch.float32, device=logits.device)
        total_sq = torch.zeros_like(total)
        used = torch.zeros(b, dtype=torch.long, device=logits.device)
        active = torch.arange(b, device=logits.device)
        rows_per_chunk = max(1, max_batch_tokens // max(1, length))
        replay: dict = {}
        sample_probs = None
        with torch.random.fork_rng(devices=_cuda_devices(logits)), dropout_sampling(model, dropout), \
                (_replay_lower(stack, first, replay) if stack is not None else contextlib.nullcontext()):
            torch.manual_seed(seed)
            k = 0
            while k < samples and len(active):
                r = min(per_round, samples - k)
                # One batched forward of A*r rows: row i's r copies are adjacent (repeat_interleave).
                expanded = {n: v[active].repeat_interleave(r, dim=0) for n, v in batch.items()}
                hidden = lower[0][active].repeat_interleave(r, dim=0) if lower else None
                chunks = []
                for start in range(0, len(active) * r, rows_per_chunk):
                    part = {n: v[start:start + rows_per_chunk] for n, v in expanded.items()}
                    if hidden is not None:
                        replay["h"] = hidden[start:start + rows_per_chunk]
                    chunks.append(_logits(model, part, autocast_dtype).softmax(-1))
                p_round = torch.cat(chunks).view(len(active), r, c)
                if return_samples:
                    sample_probs = p_round
                total[active] += p_round.sum(1)
                total_sq[active] += p_round.square().sum(1)
                used[active] += r
                k += r
                if adaptive is not None and k < samples:
                    width = score_halfwidth(total[active] / k, total_sq[active] / k, k, samples, adaptive.z)
                    active = active[width > adaptive.tolerance]
        mc_probs = total / used.clamp_min(1).unsqueeze(1).to(total.dtype)
        h_mc = entropy(mc_probs)
        return MCOutput(
            logits=logits, probs=probs, entropy=entropy(probs), mc_probs=mc_probs, mc_uncertainty=h_mc,
            mc_score=normalized_score(h_mc, c), sample_probs=sample_probs, samples_used=used)


def _cuda_devices(t: torch.Tensor) -> list:
    return [t.device] if t.device.type == "cuda" else []
