"""MC-Dropout really samples (the reference implementation's K passes were identical)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig, RobertaConfig

from muki_ray.method.mc_dropout import (
    AdaptiveK,
    check_sampling,
    dropout_sampling,
    entropy,
    mc_predict,
    normalized_score,
    sampled_dropout,
    score_halfwidth,
    transformer_layers,
)


def tiny(arch: str, p: float = 0.3, num_labels: int = 3):
    common = dict(vocab_size=60, num_labels=num_labels, max_position_embeddings=64)
    if arch == "bert":
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         hidden_dropout_prob=p, **common)
    elif arch == "roberta":
        cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            hidden_dropout_prob=p, pad_token_id=1, **common)
    else:
        cfg = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=p, seq_classif_dropout=p,
                               **common)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def batch(b=4, length=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (b, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_passes_differ_and_mean_is_mc_probs(arch):
    model = tiny(arch)
    out = mc_predict(model, batch(), samples=6, seed=0, return_samples=True)
    s = out.sample_probs
    assert s.shape == (4, 6, 3)
    # The K passes really differ (pairwise, for every row).
    for k in range(1, 6):
        assert not torch.allclose(s[:, 0], s[:, k], atol=1e-6)
    torch.testing.assert_close(out.mc_probs, s.mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.mc_uncertainty, entropy(out.mc_probs), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.mc_score, 1 - out.mc_uncertainty / math.log(3))
    torch.testing.assert_close(out.probs, out.logits.softmax(-1))


def test_same_seed_same_pbar_different_seed_differs():
    model = tiny("bert")
    a = mc_predict(model, batch(), samples=4, seed=7).mc_probs
    b = mc_predict(model, batch(), samples=4, seed=7).mc_probs
    c = mc_predict(model, batch(), samples=4, seed=8).mc_probs
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-6)


def test_global_rng_untouched():
    model = tiny("bert")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mc_predict(model, batch(), samples=3, seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_dropout_zero_equals_deterministic(arch):
    model = tiny(arch, p=0.3)
    out = mc_predict(model, batch(), samples=5, dropout=0.0, return_samples=True)
    for k in range(5):
        torch.testing.assert_close(out.sample_probs[:, k], out.probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.mc_uncertainty, out.entropy, atol=1e-6, rtol=0)


def test_override_reaches_every_architecture_and_is_restored():
    for arch in ["bert", "roberta", "distilbert"]:
        model = tiny(arch, p=0.1)
        before = model.config.to_dict()
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops
        with dropout_sampling(model, 0.5) as active:
            assert all(m.p == 0.5 and m.training for m in active)
            assert not any(m.training for m in model.modules() if not isinstance(m, torch.nn.Dropout))
        assert all(m.p == 0.1 and not m.training for m in drops)
        assert model.config.to_dict() == before


def test_training_flags_restored():
    model = tiny("bert").train()
    mc_predict(model, batch(), samples=2)
    assert all(m.training for m in model.modules())
    model.eval()
    mc_predict(model, batch(), samples=2)
    assert not any(m.training for m in model.modules())


def test_higher_dropout_more_uncertain_on_average():
    model = tiny("bert", p=0.1)
    low = mc_predict(model, batch(8), samples=16, dropout=0.05).mc_probs
    high = mc_predict(model, batch(8), samples=16, dropout=0.6, return_samples=True)
    spread_high = high.sample_probs.std(1).mean()
    spread_low = mc_predict(model, batch(8), samples=16, dropout=0.05, return_samples=True).sample_probs.std(1).mean()
    assert spread_high > spread_low
    assert low.shape == (8, 3)


def test_k_samples_run_batched_not_sequential():
    model = tiny("bert")
    calls = []
    hook = model.bert.register_forward_hook(lambda m, i, o: calls.append(o.last_hidden_state.shape[0]))
    b, k, length = 4, 8, 12
    mc_predict(model, batch(b, length), samples=k, max_batch_tokens=10**6)
    assert calls == [b, b * k]  # one deterministic forward, one forward of B*K rows
    calls.clear()
    mc_predict(model, batch(b, length), samples=k, max_batch_tokens=12 * 10)  # 10 rows per chunk
    assert calls == [b, 10, 10, 10, 2]
    hook.remove()


def test_normalized_score_hand_worked():
    c3 = torch.tensor
    assert normalized_score(entropy(c3([1 / 3, 1 / 3, 1 / 3])), 3).item() == pytest.approx(0.0, abs=1e-6)
    assert normalized_score(entropy(c3([1.0, 0.0, 0.0])), 3).item() == pytest.approx(1.0)
    assert normalized_score(entropy(c3([0.5, 0.5, 0.0])), 3).item() == pytest.approx(1 - math.log(2) / math.log(3))
    assert entropy(c3([0.5, 0.5])).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="1 label"):
        normalized_score(torch.tensor([0.0]), 1)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_a_teacher_without_sampled_dropout_is_refused(arch):
    """Hidden dropout 0 leaves only attention-probability dropout, which MC does not sample: the
    K passes would be identical. The probe sees it on the real model and on the meta skeleton."""
    b = batch(1)
    silent = tiny(arch, p=0.0)
    out = mc_predict(silent, b, samples=3, return_samples=True)
    assert torch.equal(out.sample_probs[:, 0], out.sample_probs[:, 1])  # what the check prevents
    with pytest.raises(ValueError, match="teacher 'silent': no dropout with p > 0 runs in its forward"):
        check_sampling("silent", silent, b, None)
    check_sampling("silent", silent, b, 0.1)  # mc.dropout makes the passes differ
    check_sampling("loud", tiny(arch, p=0.1), b, None)
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(silent.config)
    meta = {"input_ids": torch.ones(1, 4, dtype=torch.long, device="meta")}
    assert sampled_dropout(skeleton, meta) and not any(sampled_dropout(skeleton, meta))
    assert all(p == 0.3 for p in sampled_dropout(skeleton, meta, 0.3))


class _Gap(torch.nn.Module):
    """A 2-label "classifier" whose logits are (0, gap) for every row, whatever the dropout."""

    def __init__(self, gap: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.0, gap]))
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.w.expand(len(input_ids), 2)})()


def test_scores_do_not_saturate_in_float64():
    """Past a logit gap of about 21, 1 - H/log 2 is exactly 1.0 in float32; in float64, from
    log-probabilities, two confident teachers keep their order."""
    b = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    scores = {}
    for gap in (25.0, 30.0):
        out = mc_predict(_Gap(gap), b, samples=3, dropout=0.0)
        assert out.mc_score.dtype == out.entropy.dtype == out.mc_uncertainty.dtype == torch.float64
        log_q = -math.log1p(math.exp(-gap))               # log p(label 1)
        log_p = -gap + log_q                               # log p(label 0)
        h = -(math.exp(log_p) * log_p + math.exp(log_q) * log_q)
        assert out.mc_uncertainty.item() == pytest.approx(h, rel=1e-9)
        assert 1 - out.mc_score.item() == pytest.approx(h / math.log(2), rel=1e-9)
        assert float(torch.tensor(1.0 - h / math.log(2), dtype=torch.float32)) == 1.0  # float32 would tie
        scores[gap] = out.mc_score.item()
    assert scores[25.0] < scores[30.0] < 1.0


# ------------------------------------------------------------ mc.layers: sample only the top N layers
@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("layers", [1, 2])
def test_top_layers_replay_is_exact_without_dropout(arch, layers):
    """With p = 0 every sampled pass must equal the deterministic one: the replayed lower output is right."""
    model = tiny(arch)
    out = mc_predict(model, batch(), samples=3, dropout=0.0, layers=layers, return_samples=True)
    for k in range(3):
        torch.testing.assert_close(out.sample_probs[:, k], out.probs, atol=1e-5, rtol=0)
    assert len(transformer_layers(model)) == 2  # the stack was restored


def test_top_layers_skip_the_lower_layers_and_still_sample():
    model = tiny("bert")
    stack = transformer_layers(model)
    rows = {0: [], 1: []}
    hooks = [stack[i].register_forward_hook(lambda m, a, o, i=i: rows[i].append(o.shape[0])) for i in (0, 1)]
    b, k = 4, 5
    out = mc_predict(model, batch(b), samples=k, layers=1, return_samples=True)
    for h in hooks:
        h.remove()
    assert rows[0] == [b]             # the lower layer ran once, in the deterministic pass
    assert rows[1] == [b, b * k]      # the top layer ran for the deterministic and the sampled rows
    assert not torch.allclose(out.sample_probs[:, 0], out.sample_probs[:, 1], atol=1e-6)
    with pytest.raises(ValueError, match=r"mc.layers must be in \[1, 2\]"):
        mc_predict(model, batch(b), samples=2, layers=3)


# ------------------------------------------------------------ adaptive K
def test_score_halfwidth_hand_worked():
    # Two passes [0.8, 0.2] and [0.6, 0.4] of K = 4: mean [0.7, 0.3], mean of squares [0.5, 0.1].
    # Unbiased var 0.01 * 2 = 0.02 -> σ = 0.1414; move = σ √2 / 4 = 0.05 per class.
    # |ln 0.7 + 1| + |ln 0.3 + 1| = 0.6433 + 0.2040; z = 2; / ln 2.
    w = score_halfwidth(torch.tensor([[0.7, 0.3]]), torch.tensor([[0.5, 0.1]]), k=2, total=4, z=2.0)
    want = 2 * 0.05 * (abs(math.log(0.7) + 1) + abs(math.log(0.3) + 1)) / math.log(2)
    assert w.item() == pytest.approx(want, rel=1e-4)
    f64 = dict(dtype=torch.float64)
    assert score_halfwidth(torch.tensor([[0.7, 0.3]], **f64), torch.tensor([[0.49, 0.09]], **f64), k=2, total=4,
                           z=2.0).item() == pytest.approx(0.0, abs=1e-6)  # identical passes: pinned
    assert score_halfwidth(torch.tensor([[0.7, 0.3]]), torch.tensor([[0.5, 0.1]]), k=4, total=4, z=2.0).item() == 0


def test_adaptive_stops_pinned_rows_and_keeps_the_rest_sampling():
    model = tiny("bert", p=0.3)
    k = 12
    loose = mc_predict(model, batch(6), samples=k, adaptive=AdaptiveK(tolerance=10.0, round=3))
    assert loose.samples_used.tolist() == [3] * 6          # every row pinned after one round
    strict = mc_predict(model, batch(6), samples=k, adaptive=AdaptiveK(tolerance=0.0, round=3))
    assert strict.samples_used.tolist() == [k] * 6         # nothing is ever pinned at ε = 0
    mid = mc_predict(model, batch(6), samples=k, adaptive=AdaptiveK(tolerance=0.01, round=3))
    assert set(mid.samples_used.tolist()) <= {3, 6, 9, 12}
    torch.testing.assert_close(mid.mc_probs.sum(-1), torch.ones(6))
    # Without dropout noise every row is pinned at once and p̄ equals the deterministic probs.
    calm = mc_predict(model, batch(6), samples=k, dropout=0.0, adaptive=AdaptiveK(round=2))
    assert calm.samples_used.tolist() == [2] * 6
    torch.testing.assert_close(calm.mc_probs, calm.probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_attention_dropout_is_sampled_exactly_per_row_and_restored(arch):
    """Hidden dropout 0, attention dropout 0.3: only `attention_dropout` makes the passes differ;
    a row's p̄ is the same alone or among others, and the model is left as it was."""
    common = dict(vocab_size=60, num_labels=3, max_position_embeddings=64)
    if arch == "bert":
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3, **common)
    else:
        cfg = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0, seq_classif_dropout=0.0,
                               attention_dropout=0.3, **common)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    impl = model.config._attn_implementation
    b = batch(4)
    with pytest.raises(ValueError, match="no dropout with p > 0"):
        check_sampling("attn", model, b, None)
    check_sampling("attn", model, b, None, attention=True)
    assert sampled_dropout(model, b, None, attention=True).count(0.3) == 2  # one call per layer
    out = mc_predict(model, b, samples=4, return_samples=True, attention_dropout=True,
                     row_seeds=torch.arange(4, dtype=torch.int64))
    for k in range(1, 4):
        assert not torch.allclose(out.sample_probs[:, 0], out.sample_probs[:, k], atol=1e-6)
    alone = mc_predict(model, {n: v[1:2] for n, v in b.items()}, samples=4, attention_dropout=True,
                       row_seeds=torch.tensor([1]))
    torch.testing.assert_close(alone.mc_probs[0], out.mc_probs[1], atol=1e-5, rtol=0)
    padded = {"input_ids": torch.cat([b["input_ids"][1:2], torch.zeros(1, 5, dtype=torch.long)], 1),
              "attention_mask": torch.cat([b["attention_mask"][1:2], torch.zeros(1, 5, dtype=torch.long)], 1)}
    longer = mc_predict(model, padded, samples=4, attention_dropout=True, row_seeds=torch.tensor([1]))
    torch.testing.assert_close(longer.mc_probs[0], out.mc_probs[1], atol=1e-5, rtol=0)
    assert model.config._attn_implementation == impl and not model.training
    assert not any(m.training for m in model.modules()) and torch.nn.functional.dropout.__module__ == "torch.nn.functional"


# ------------------------------------------------------------ precision: the output layer stays fp32
@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_bf16_autocast_keeps_the_teacher_ranking_of_confident_rows(arch):
    """Two teachers with one body, the second's output layer 1.003x the first's: on rows whose logit
    gaps exceed 16 the second is more confident on every row, in fp32. Under bf16 autocast a bf16
    logit moves in steps of 0.125 there, so the two would tie; the output layer runs in fp32 and the
    ranking holds, for the deterministic and the MC scores."""
    a = tiny(arch, p=0.1, num_labels=2)
    head = [m for m in a.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 2][-1]
    b_ = batch(b=48, length=10)
    with torch.no_grad():
        gap = (a(**b_).logits[:, 1] - a(**b_).logits[:, 0]).abs()
        head.weight.mul_(24.0 / gap.median())
        head.bias.zero_()
    def run():
        return {d: mc_predict(a, b_, samples=4, autocast_dtype=d, return_samples=True) for d in (None, torch.bfloat16)}

    out_a = run()
    with torch.no_grad():
        head.weight.mul_(1.003)
    out_b = run()
    lg = out_a[None].logits
    rows = ((lg[:, 1] - lg[:, 0]).abs() > 16).nonzero().flatten()
    # For p̄, the rows whose passes all pick the deterministic label (a sharper head then lowers H(p̄)).
    agree = (out_a[None].sample_probs.argmax(-1) == lg.argmax(-1, keepdim=True)).all(1)
    agree &= out_a[None].mc_score < 1 - 1e-12  # and whose score is not 1.0 in float64 itself
    mc_rows = rows[agree[rows]]
    assert len(rows) >= 10 and len(mc_rows) >= 5
    for d in (None, torch.bfloat16):
        assert (out_b[d].entropy[rows] < out_a[d].entropy[rows]).all(), d
        assert (out_b[d].mc_score[mc_rows] > out_a[d].mc_score[mc_rows]).all(), d


def test_the_fast_mask_keeps_exactly_what_its_definition_keeps():
    """`_seeded_mask` (in-place splitmix64, an integer threshold on int16 lanes) keeps the same
    elements as the definition `uniform_like(x) >= p`, bit for bit, for every p, shape and module; a
    change of the masks' stream would silently change every cached teacher's p̄."""
    from muki_ray.method.mc_dropout import _seeded_mask, splitmix64, uniform_like

    g = torch.Generator().manual_seed(0)
    for shape in [(6, 40, 32), (3, 5, 2, 7), (4, 17), (2, 1)]:
        x = torch.randn(*shape, generator=g)
        seeds = splitmix64(torch.arange(shape[0], dtype=torch.int64) * 7919 + 11)
        for p in [0.1, 0.3, 0.5, 1 / 3, 0.123456789, 1e-7, 0.99999]:
            for module in [0, 5, 40]:
                want = x * (uniform_like(x, seeds, module) >= p).to(x.dtype) / (1.0 - p)
                assert torch.equal(_seeded_mask(x, p, seeds, module), want), (shape, p, module)
    # a value whose 16-bit threshold is an exact integer: u == p must be kept, as `>=` keeps it
    x = torch.ones(64, 512)
    seeds = torch.arange(64, dtype=torch.int64)
    u = uniform_like(x, seeds, 2)
    p = float(u.flatten()[123])
    assert torch.equal(_seeded_mask(x, p, seeds, 2) != 0, u >= p)


def test_the_masks_uniforms_are_the_documented_lanes_of_one_splitmix64_per_four_elements():
    """Hand-computed in Python integers: element (r, i, j) of a 3-D input takes 16-bit lane j mod 4 of
    splitmix64(row key + splitmix64((i << 16) | (j div 4))), the row key being seed ^ splitmix64(module + 1);
    u = (signed lane + 2^15) / 2^16. Any change of this stream would change every cached teacher's p̄."""
    from muki_ray.method.mc_dropout import _splitmix64_int, uniform_like

    m64 = (1 << 64) - 1
    seeds = torch.tensor([12345, -987654321987], dtype=torch.int64)
    x = torch.zeros(2, 3, 10)
    u = uniform_like(x, seeds, 7)
    for r, i, j in [(0, 0, 0), (0, 0, 3), (0, 2, 9), (1, 1, 4), (1, 2, 6), (1, 0, 1)]:
        key = int(seeds[r]) ^ _splitmix64_int(7 + 1)
        z = _splitmix64_int(((key + _splitmix64_int((i << 16) | (j // 4))) + (1 << 63)) % (1 << 64) - (1 << 63))
        lane = ((z & m64) >> (16 * (j % 4))) & 0xFFFF
        signed = lane - 65536 if lane >= 32768 else lane
        assert u[r, i, j].item() == (signed + 32768) / 65536, (r, i, j)
    # a shorter (unpadded) tensor is a corner of the longer one, element for element
    assert torch.equal(uniform_like(torch.zeros(2, 2, 7), seeds, 7), u[:, :2, :7])
    assert torch.equal(uniform_like(torch.zeros(2, 3, 3), seeds, 7), u[:, :, :3])


def test_masks_drop_p_of_the_elements_independently_of_row_module_and_position():
    from muki_ray.method.mc_dropout import _seeded_mask, sample_seeds

    x = torch.ones(64, 32, 48)
    seeds = sample_seeds(torch.arange(8, dtype=torch.int64) * 1_000_003, 0, 8)  # 8 rows x 8 samples
    a = _seeded_mask(x, 0.1, seeds, 0) == 0
    b = _seeded_mask(x, 0.1, seeds, 1) == 0
    n = a.numel()
    assert abs(a.float().mean().item() - 0.1) < 4 * math.sqrt(0.09 / n)
    # two modules, two rows, two positions: the drops co-occur as independent ones would (0.01)
    both = [(a & b).float().mean(), (a[0::2] & a[1::2]).float().mean(), (a[:, :, 0::2] & a[:, :, 1::2]).float().mean()]
    for rate in both:
        assert abs(rate.item() - 0.01) < 0.004, both
    assert torch.equal(a[3], (_seeded_mask(x[3:4], 0.1, seeds[3:4], 0) == 0)[0])  # a row's mask is its own
