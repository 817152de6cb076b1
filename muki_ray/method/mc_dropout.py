"""Monte-Carlo Dropout for a Hugging Face sequence classifier (MUKI step 1). Pure torch.

For each row: one deterministic pass (dropout off) and K stochastic passes in which ONLY the
`nn.Dropout` modules are in train mode, everything under `torch.inference_mode()`.

Which dropout is sampled: in transformers 5, BERT-style attention (BERT, RoBERTa, DistilBERT,
MPNet, ...) applies attention-probability dropout as `dropout=0.0 if not self.training`, i.e. it
follows the *attention module's* flag, which stays False here. So the K passes sample the hidden
dropout only - embeddings, attention output, FFN output and the classifier head - which is the
reference setting (hidden dropout p = 0.1). `attention_dropout=True` (`mc.attention_dropout`)
samples the attention probabilities too, as the authors' code does by putting the whole model in
train mode: the K passes then run in train mode with eager attention (a fused kernel's dropout
draws from torch's global generator, which cannot be seeded per row), and every functional
dropout call is seeded like the modules. An `mc.dropout` override sets `p` on every dropout
module for the K passes only, and restores it after; the model's config is never edited.

The K samples run as one batched forward over B*K rows (each row repeated K times), chunked to
`max_batch_tokens` tokens. Masks are exact per row: during the K passes every `nn.Dropout` draws
its mask from a counter-based hash of (the row's seed, the sample k, the module, the element's
position), not from torch's global generator. A row's p̄ is therefore the same whatever its batch,
chunk, neighbours or padding (positions are indexed independently of the padded length), and
torch's global RNG is never touched. The teacher stage seeds each row from (mc.seed, teacher, id).

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class MCOutput:
    """Per-row MC-Dropout results; C = the teacher's label count.

    Distributions are float32; the entropies and the score are float64, computed from
    log-probabilities, because s = 1 - H/log C rounds to exactly 1.0 in float32 once a 2-label
    teacher's logit gap passes about 21, and two saturated teachers would then tie.
    """

    logits: torch.Tensor            # (B, C) float32 deterministic logits
    probs: torch.Tensor             # (B, C) float32 softmax(logits)
    entropy: torch.Tensor           # (B,) float64 H(probs), nats
    mc_probs: torch.Tensor          # (B, C) float32 p̄ = mean_k softmax(f(x; W_k))
    mc_uncertainty: torch.Tensor    # (B,) float64 H(p̄), nats
    mc_score: torch.Tensor          # (B,) float64 s = 1 - H(p̄) / log C, in [0, 1]
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


# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; int64 products wrap).
_GOLDEN = -7046029254386353131   # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687     # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685     # 0x94D049BB133111EB
_DIM_BITS = 16                   # each non-row dimension of a dropout input indexes < 65536 elements


def _lsr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (the arithmetic shift, with the sign bits masked off)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors: a bijective, well-mixed hash of 64-bit counters."""
    z = z + _GOLDEN
    z = (z ^ _lsr(z, 30)) * _MIX1
    z = (z ^ _lsr(z, 27)) * _MIX2
    return z ^ _lsr(z, 31)


def sample_seeds(row_seeds: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """(A,) row seeds -> (A * count,) seeds of samples first .. first+count-1, row-major (row i's
    samples adjacent, like repeat_interleave)."""
    k = torch.arange(first, first + count, device=row_seeds.device, dtype=torch.int64)
    return splitmix64(row_seeds[:, None] ^ splitmix64(k + 1)[None, :]).reshape(-1)


def uniform_like(x: torch.Tensor, seeds: torch.Tensor, module: int) -> torch.Tensor:
    """U[0, 1) of x's shape from (seeds (R,) of its rows, module index, element position), in steps
    of 2^-16: the definition of the masks (`_seeded_mask` keeps exactly the elements where u >= p).

    Each splitmix64 draw gives four elements their uniforms: the element at position
    (i_1, ..., i_n) past the row dimension takes 16-bit lane i_n mod 4 of the draw at
    (i_1, ..., i_{n-1}, i_n div 4), a signed lane s giving u = (s + 2^15) / 2^16. A draw's
    position is packed as Σ i_j 2^(16 (n-j)), so no element depends on the tensor's other sizes
    (a padded length changes nothing).
    """
    s = _lanes(x.shape, seeds, module, x.device)[..., :x.shape[-1] if x.dim() > 1 else 1]
    return (s.to(torch.float32) + 32768.0).reshape(x.shape) * (1.0 / 65536)


def _splitmix64_int(z: int) -> int:
    """`splitmix64` of one int64 in Python ints (no device tensor, no transfer per dropout call)."""
    m = (1 << 64) - 1
    z = (z + _GOLDEN) & m
    z = ((z ^ (z >> 30)) * (_MIX1 & m)) & m
    z = ((z ^ (z >> 27)) * (_MIX2 & m)) & m
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def _module_key(seeds: torch.Tensor, module: int, dims: int, add: int = 0) -> torch.Tensor:
    """(R,) row seeds -> (R, 1, ...) keys of dropout call `module` (plus `add`, wrapping), broadcastable
    over a row."""
    key = seeds ^ _splitmix64_int(module + 1)
    return (key + add if add else key).view((-1,) + (1,) * (dims - 1))


_POSITIONS: dict = {}  # (shape past the rows, device) -> splitmix64 of the packed positions


def _position_hash(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """splitmix64 of each element's packed position, (1, *shape[1:]) int64; cached per shape, since
    a stage's forwards repeat a few shapes (and 13 dropout calls per forward share one)."""
    cached = _POSITIONS.get((tuple(shape[1:]), device))
    if cached is not None:
        return cached
    if len(shape) - 1 > 3 or any(d >= (1 << _DIM_BITS) for d in shape[1:]):
        raise ValueError(f"seeded dropout supports up to 3 dims of < 65536 per row, got {tuple(shape)}")
    idx = torch.zeros((1,) * len(shape), dtype=torch.int64, device=device)
    for j, n in enumerate(shape[1:], start=1):
        view = [1] * len(shape)
        view[j] = n
        idx = idx + (torch.arange(n, device=device, dtype=torch.int64) << (_DIM_BITS * (len(shape) - 1 - j))).view(view)
    if len(_POSITIONS) >= 64:  # padded lengths vary from batch to batch: keep the cache bounded
        _POSITIONS.clear()
    _POSITIONS[(tuple(shape[1:]), device)] = hashed = splitmix64(idx)
    return hashed


def _lanes(shape: torch.Size, seeds: torch.Tensor, module: int, device: torch.device) -> torch.Tensor:
    """The masks' random bits: int16 (R, *shape[1:-1], 4 ceil(n / 4)) for a tensor of `shape`, n its
    last size (a 1-D tensor is one element per row). One splitmix64 per 4 elements, in place on one
    int64 buffer (its constant added to the row keys), read as four int16 lanes: lane j is bits
    16j .. 16j+15 on the little-endian machines torch runs on."""
    shape = tuple(shape) if len(shape) > 1 else (shape[0], 1)
    draws = (*shape[:-1], -(-shape[-1] // _PER_DRAW))
    z = _module_key(seeds, module, len(draws), add=_GOLDEN) + _position_hash(draws, device)
    shifted = torch.empty_like(z)
    for bits, mult in ((30, _MIX1), (27, _MIX2), (31, None)):  # splitmix64, in place
        torch.bitwise_right_shift(z, bits, out=shifted)
        shifted &= (1 << (64 - bits)) - 1
        z ^= shifted
        if mult is not None:
            z *= mult
    return z.view(torch.int16)


_PER_DRAW = 4  # elements per splitmix64 draw: four 16-bit lanes of its 64 bits


def _seeded_mask(x: torch.Tensor, p: float, seeds: torch.Tensor, index: int) -> torch.Tensor:
    """Inverted dropout of x with the per-row counter-based mask of dropout call `index`: keeps
    exactly the elements where `uniform_like(x, seeds, index) >= p`, as an integer test on the int16
    lanes, s >= ceil(p' 2^16) - 2^15, where p' is p rounded to float32 as the float test does.

    Cost over a MiniLM teacher's K passes on CPU, against the same passes without masks
    (`benchmarks/throughput.py --only mask`, 1 and 2 threads, one run): one 64-bit hash per
    element +86% / +82%, that hash cached and in place +24% / +9%, these 16-bit lanes (one hash per
    four elements) +3% / +2%, torch's own unseeded dropout +11% / +18%.
    """
    threshold = math.ceil(float(np.float32(p)) * 65536)
    if threshold >= 65536:
        return torch.zeros_like(x)
    s = _lanes(x.shape, seeds, index, x.device)
    keep = (s[..., :x.shape[-1]] if x.dim() > 1 else s[..., :1].reshape(x.shape)) >= threshold - 32768
    return (x * keep).div_(1.0 - p)


@contextlib.contextmanager
def seeded_dropout(model: nn.Module, state: dict, functional: bool = False) -> Iterator[None]:
    """Every nn.Dropout of `model` draws its mask from `uniform_like` with state["seeds"], the
    seeds of the rows of the forward about to run; restored after. With `functional`, so does
    every `torch.nn.functional.dropout` call (attention probabilities): the i-th call of a forward
    is dropout index (number of modules) + i, a stable name since a forward's calls run in order."""
    patched = []
    for i, m in enumerate(m for m in model.modules() if type(m) is nn.Dropout):
        def forward(x, m=m, i=i):
            if not m.training or m.p == 0.0:
                return x
            return _seeded_mask(x, m.p, state["seeds"], i)
        m.forward = forward
        patched.append(m)
    original, hook = F.dropout, None
    if functional:
        def dropout(x, p=0.5, training=True, inplace=False):
            state.setdefault("functional_p", []).append(float(p) if training else 0.0)  # for sampled_dropout
            if not training or p == 0.0:
                return x
            state["calls"] += 1
            return _seeded_mask(x, p, state["seeds"], len(patched) + state["calls"] - 1)
        hook = model.register_forward_pre_hook(lambda *_: state.__setitem__("calls", 0))
        F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original
        if hook is not None:
            hook.remove()
        for m in patched:
            del m.forward


@contextlib.contextmanager
def eager_attention(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Attention computed by transformers' eager path (its dropout is `F.dropout`); restored after."""
    old = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = on and old not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(old)


def sampled_dropout(model: nn.Module, batch: dict[str, torch.Tensor], p: Optional[float] = None,
                    attention: bool = False) -> list[float]:
    """The p of every dropout call in one sampled forward of `batch`: which dropout MC really samples
    (without `attention`, attention-probability dropout follows its attention module's flag and is
    skipped). Works on the meta device with `input_ids` alone, so a teacher is checked before its
    weights load."""
    called: list[float] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: called.append(float(mod.p)))
             for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    state = {"seeds": torch.zeros(len(batch["input_ids"]), dtype=torch.int64, device=batch["input_ids"].device)}
    try:
        with torch.inference_mode(), dropout_sampling(model, p, attention), eager_attention(model, attention), \
                seeded_dropout(model, state, functional=attention):
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return called + state.get("functional_p", [])


def check_sampling(name: str, model: nn.Module, batch: dict[str, torch.Tensor], p: Optional[float],
                   attention: bool = False) -> None:
    """ValueError naming teacher `name` when its K passes could not differ: no dropout with p > 0
    runs in its forward (dropout 0, or only functional dropout), with the `mc.dropout` override p."""
    if not any(x > 0 for x in sampled_dropout(model, batch, p, attention)):
        raise ValueError(f"teacher {name!r}: no dropout with p > 0 runs in its forward, so its K MC-Dropout "
                         f"passes would be identical; set its mc.dropout (for example 0.1)")


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -Σ p log p over the last dim, nats, float64; 0·log 0 = 0. (..., C) -> (...)."""
    p = p.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def entropy_of_log(logp: torch.Tensor) -> torch.Tensor:
    """H(p) from log p (..., C) -> (...), float64, nats; exact where p underflows (p log p -> 0)."""
    logp = logp.double()
    return -(logp.exp() * logp.clamp_min(-1e300)).sum(-1)


def normalized_score(h: torch.Tensor, num_labels: int) -> torch.Tensor:
    """s = 1 - H / log C in [0, 1]; undefined (ValueError) for a single-label teacher."""
    if num_labels < 2:
        raise ValueError(f"a teacher with {num_labels} label(s) has no usable uncertainty (log C = 0)")
    return (1.0 - h / math.log(num_labels)).clamp(0.0, 1.0)


@contextlib.contextmanager
def dropout_sampling(model: nn.Module, p: Optional[float] = None, attention: bool = False) -> Iterator[list[nn.Module]]:
    """Put only the dropout modules in train mode (with `attention`, the whole model, so attention
    modules pass their dropout p on), optionally at probability p; restore after."""
    saved = [(m, m.training, getattr(m, "p", None)) for m in model.modules()]
    drops = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    try:
        model.train(attention)
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


def output_layer(model: nn.Module) -> Optional[nn.Linear]:
    """The classifier's last label-sized linear layer (`classifier`, `classifier.out_proj`, `score`,
    ...): the last `nn.Linear` in module order whose outputs are the model's `num_labels`."""
    c = getattr(getattr(model, "config", None), "num_labels", None)
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == c]
    return found[-1] if found else None


@contextlib.contextmanager
def fp32_output(model: nn.Module) -> Iterator[None]:
    """Under autocast, compute the output layer in float32 from the (autocast) features.

    A bf16 logit has 8 significant bits: between 16 and 32 its step is 0.125, so two confident
    teachers' logit gaps round to the same value, their float64 scores tie and their order is lost.
    """
    layer = output_layer(model)
    if layer is None:
        yield
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if layer.bias is None else layer.bias.float()
            return F.linear(x.float(), layer.weight.float(), bias)

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward


def _logits(model: nn.Module, batch: dict, autocast_dtype: Optional[torch.dtype]) -> torch.Tensor:
    if autocast_dtype is None:
        return model(**batch).logits.float()
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast_dtype), fp32_output(model):
        return model(**batch).logits.float()


def mc_predict(model: nn.Module, batch: dict[str, torch.Tensor], *, samples: int, dropout: Optional[float] = None,
               seed: int = 0, max_batch_tokens: int = 65536, return_samples: bool = False,
               autocast_dtype: Optional[torch.dtype] = None, layers: Optional[int] = None,
               adaptive: Optional[AdaptiveK] = None, row_seeds: Optional[torch.Tensor] = None,
               attention_dropout: bool = False) -> MCOutput:
    """Deterministic and MC-Dropout predictions for a tokenized batch.

    batch: {input_ids (B, L), attention_mask (B, L), [token_type_ids (B, L)]} on the model's device.
    samples: K >= 1. dropout: p for the K passes (None: each module's own p).
    max_batch_tokens: at most this many rows*L tokens per forward of the B*K sampled rows.
    layers: sample only the top N layers and the head (None: every layer and the embeddings).
    adaptive: stop rows early (None: every row gets K passes).
    row_seeds: (B,) int64 seeds of the rows' masks (None: derived from `seed` and the row's index,
    so a row's masks then depend on its place in the batch).
    attention_dropout: sample attention-probability dropout too (see the module docstring).
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
        logp = logits.double().log_softmax(-1)

        per_round = samples if adaptive is None else min(adaptive.round, samples)
        # Running sums over the passes, float64: log Σ_k p_k (for H(p̄) from log p̄), Σ p, Σ p².
        log_total = torch.full((b, c), -math.inf, dtype=torch.float64, device=logits.device)
        total = torch.zeros(b, c, dtype=torch.float64, device=logits.device)
        total_sq = torch.zeros_like(total)
        used = torch.zeros(b, dtype=torch.long, device=logits.device)
        active = torch.arange(b, device=logits.device)
        rows_per_chunk = max(1, max_batch_tokens // max(1, length))
        if row_seeds is None:
            row_seeds = splitmix64(torch.arange(b, dtype=torch.int64) + splitmix64(torch.tensor(seed)))
        row_seeds = row_seeds.to(device=logits.device, dtype=torch.int64)
        replay: dict = {}
        masks: dict = {}
        sample_probs = None
        with dropout_sampling(model, dropout, attention_dropout), eager_attention(model, attention_dropout), \
                seeded_dropout(model, masks, functional=attention_dropout), \
                (_replay_lower(stack, first, replay) if stack is not None else contextlib.nullcontext()):
            k = 0
            while k < samples and len(active):
                r = min(per_round, samples - k)
                # One batched forward of A*r rows: row i's r copies are adjacent (repeat_interleave).
                expanded = {n: v[active].repeat_interleave(r, dim=0) for n, v in batch.items()}
                hidden = lower[0][active].repeat_interleave(r, dim=0) if lower else None
                seeds = sample_seeds(row_seeds[active], k, r)
                chunks = []
                for start in range(0, len(active) * r, rows_per_chunk):
                    part = {n: v[start:start + rows_per_chunk] for n, v in expanded.items()}
                    masks["seeds"] = seeds[start:start + rows_per_chunk]
                    if hidden is not None:
                        replay["h"] = hidden[start:start + rows_per_chunk]
                    chunks.append(_logits(model, part, autocast_dtype).double().log_softmax(-1))
                logp_round = torch.cat(chunks).view(len(active), r, c)
                p_round = logp_round.exp()
                if return_samples:
                    sample_probs = p_round.float()
                log_total[active] = torch.logaddexp(log_total[active], logp_round.logsumexp(1))
                total[active] += p_round.sum(1)
                total_sq[active] += p_round.square().sum(1)
                used[active] += r
                k += r
                if adaptive is not None and k < samples:
                    width = score_halfwidth(total[active] / k, total_sq[active] / k, k, samples, adaptive.z)
                    active = active[width > adaptive.tolerance]
        log_mc = log_total - used.clamp_min(1).unsqueeze(1).to(torch.float64).log()  # log p̄
        h_mc = entropy_of_log(log_mc)
        return MCOutput(
            logits=logits, probs=logp.exp().float(), entropy=entropy_of_log(logp), mc_probs=log_mc.exp().float(),
            mc_uncertainty=h_mc, mc_score=normalized_score(h_mc, c), sample_probs=sample_probs, samples_used=used)

