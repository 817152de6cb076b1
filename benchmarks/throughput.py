"""Teacher-stage and student throughput against the hardware limit, all in one run on one machine.

MiniLM-L6, K=16, max length 128, real BBC and 20 Newsgroups text (plus a short-text case: the
first sentence of each BBC article). Measures:

- naive: a Hugging Face loop padded to max length, K sequential passes, fp32, dropout via train();
- optimized: the teacher stage in-process (length-sorted dynamic padding, the K samples batched up to
  the device's `mc.max_batch_tokens` budget, inference_mode, SDPA attention), fp32 and bf16 autocast;
- the Ray Data stage with 1 and with 2 actors (each actor gets its share of the cores);
- the roofline: achieved GFLOP/s (FLOPs counted per real token) against the peak matmul GFLOP/s
  measured in this run, fp32 and bf16;
- the cheaper estimates `mc.layers: 1` and adaptive K: speed, passes saved, and agreement with
  exact MC on which teacher wins (the reproduction benchmark's two fine-tuned BBC teachers);
- the student: Ray Train + DeepSpeed against a plain torch loop (steady-state examples/s);
- the seeded dropout mask's cost: the K passes with the engine's per-row masks, with the masks'
  defining formula (`uniform_like`), with torch's own unseeded dropout, and with no mask at all.

    python benchmarks/throughput.py

Writes results/throughput.{json,md}; prints the headline ratios last.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware, minilm_classifier, timed  # noqa: E402

LABELS = ("business", "entertainment", "politics")


def texts_of(dataset: str, n: int, split: str = "train") -> list[str]:
    from muki_ray.config.schema import Source
    from common import table

    return table(Source(source=dataset, split=split, limit=n)).column("text").to_pylist()


def first_sentences(texts: list[str]) -> list[str]:
    return [re.split(r"(?<=[.!?])\s", t.strip(), maxsplit=1)[0] for t in texts]


def flops_per_example(lengths: np.ndarray, hidden: int, inter: int, layers: int) -> np.ndarray:
    """Forward FLOPs of a BERT encoder per example over its real tokens: (n,) lengths -> (n,) FLOPs.

    Per token per layer: QKV + output projections 4·H², FFN 2·H·I (multiply-add = 2 FLOPs), and
    attention scores + weighted sum 2·L·H. The head is negligible.
    """
    per_token = layers * 2 * (4 * hidden * hidden + 2 * hidden * inter + 2 * lengths * hidden)
    return lengths * per_token


def peak_gflops(dtype, size: int = 1536, reps: int = 6) -> float:
    """Best-of matmul GFLOP/s for (size x size) @ (size x size) at this process's thread count.

    Two kernels, the faster counts: a plain matmul in `dtype`, and F.linear under autocast to
    `dtype` (the path the model's Linear layers take).
    """
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    kernels = [lambda: a.to(dtype) @ b.to(dtype) if dtype != torch.float32 else a @ b]
    if dtype != torch.float32:
        def linear():
            with torch.autocast("cpu", dtype=dtype):
                return torch.nn.functional.linear(a, b)
        kernels.append(linear)
    best = 0.0
    for kernel in kernels:
        kernel()
        for _ in range(reps):
            t0 = time.perf_counter()
            kernel()
            best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def naive_loop(folder: Path, texts: list[str], samples: int, batch: int = 16) -> float:
    """Seconds for the textbook loop: pad to 128, K sequential passes in train() mode, fp32."""
    import torch

    from muki_ray.core.hf_folder import load_classifier, load_tokenizer

    tok, model = load_tokenizer(folder), load_classifier(folder)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], truncation=True, max_length=128, padding="max_length",
                      return_tensors="pt")
            model.eval()
            model(**enc).logits.softmax(-1)
            model.train()
            torch.stack([model(**enc).logits.softmax(-1) for _ in range(samples)]).mean(0)
    return time.perf_counter() - t0


def stage_seconds(spec, texts: list[str], batch: int = 32):
    """(seconds, the stage, its outputs per batch) of the teacher stage called in-process."""
    from muki_ray.stages.teachers import TeacherStage

    stage = TeacherStage(spec)
    stage.predict(texts[:2])  # warm-up
    stage.passes = 0
    outs, secs = timed(lambda: [stage.predict(texts[i:i + batch]) for i in range(0, len(texts), batch)])
    return secs, stage, outs


def ray_seconds(spec, texts: list[str], actors: int, batch: int = 16) -> float:
    """Wall time of the Ray Data stage over `texts` (after a warm-up run that starts the actors)."""
    import pyarrow as pa
    import ray

    from muki_ray.data.sources import to_ray_dataset
    from muki_ray.core.stage import stage_class
    from muki_ray.stages.teachers import TeacherStage

    threads = max(1, spec.threads // actors)
    table = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts})

    def run():
        return to_ray_dataset(table, batch).map_batches(
            stage_class("teacher", TeacherStage), fn_constructor_kwargs={"spec": replace(spec, threads=threads)},
            batch_size=batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=2 / actors - 0.01).materialize()

    run()
    out, secs = timed(run)
    assert out.count() == len(texts)
    return secs


ABLATIONS = {  # name -> which optimization is switched off (all others on)
    "all on": {},
    "one B*K forward (the GPU default budget)": {"chunk": "one"},
    "K passes sequential (B rows per forward)": {"chunk": "rows"},
    "no length sort (pad per batch)": {"pad": "unsorted"},
    "pad to max length": {"pad": "max_length"},
    "no_grad instead of inference_mode": {"inference": False},
    "eager attention instead of SDPA": {"attn": "eager"},
}


def ablation(folder: Path, texts: list[str], samples: int, batch: int = 16, reps: int = 2) -> dict:
    """Seconds of the optimized fp32 loop with each optimization switched off on its own (best of reps)."""
    import contextlib
    from unittest import mock

    import torch

    from muki_ray.core.hf_folder import load_classifier, load_tokenizer
    from muki_ray.method.mc_dropout import mc_predict

    tok = load_tokenizer(folder)
    models = {impl: load_classifier(folder, attn_implementation=impl).eval() for impl in ("sdpa", "eager")}

    from muki_ray.core.hardware import mc_batch_tokens

    def run(pad="sorted", chunk="device", inference=True, attn="sdpa") -> float:
        enc = tok(texts, truncation=True, max_length=128)
        lengths = [len(x) for x in enc["input_ids"]]
        order = np.argsort(lengths, kind="stable")[::-1] if pad == "sorted" else np.arange(len(texts))
        # mc_predict enters torch.inference_mode() at call time, so patching the name swaps the mode.
        mode = contextlib.nullcontext() if inference else mock.patch("torch.inference_mode", torch.no_grad)
        t0 = time.perf_counter()
        with mode:
            for i in range(0, len(texts), batch):
                idx = order[i:i + batch]
                feats = {k: [enc[k][j] for j in idx] for k in enc.keys()}
                padded = dict(tok.pad(feats, return_tensors="pt", padding="max_length" if pad == "max_length"
                                      else "longest", max_length=128))
                width = padded["input_ids"].shape[1]
                # device: the stage's default budget on CPU (about one row's K samples per forward);
                # one: all B*K rows in one forward; rows: B rows per forward, the K samples in sequence.
                budget = {"device": mc_batch_tokens(torch.device("cpu")), "one": 1 << 30,
                          "rows": len(idx) * width}[chunk]
                mc_predict(models[attn], padded, samples=samples, max_batch_tokens=budget)
        return time.perf_counter() - t0

    run()  # warm-up
    secs = {name: float("inf") for name in ABLATIONS}
    for _ in range(reps):  # interleaved, so drift on a shared machine hits every variant alike
        for name, off in ABLATIONS.items():
            secs[name] = min(secs[name], run(**off))
    return {name: {"seconds": s, "slowdown": s / secs["all on"]} for name, s in secs.items()}


def profile_top_ops(spec, texts: list[str], rows: int = 12) -> str:
    """torch.profiler table of the optimized stage's top ops by self CPU time (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    from muki_ray.stages.teachers import TeacherStage

    stage = TeacherStage(spec)
    stage.predict(texts[:2])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stage.predict(texts)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def selection(stages_out: list[dict]) -> np.ndarray:
    """(B,) index of the teacher with the highest MC score."""
    return np.stack([o["mc_score"] for o in stages_out], 1).argmax(1)


def cheaper_estimates(teachers: list[Path], labels: list[list[str]], texts: list[str], gold: list[str],
                      samples: int, threads: int) -> dict:
    """Exact MC vs mc.layers=1 vs adaptive K on real fine-tuned teachers: time, passes, agreement."""
    from muki_ray.method.integrate import selection_quality
    from muki_ray.config.labels import LabelSpace
    from muki_ray.stages.teachers import TeacherSpec

    space = LabelSpace.from_teachers({f"t{i}": ls for i, ls in enumerate(labels)})
    gold_idx = space.encode(gold)
    # "exact, other seed": the same exact MC with other dropout masks, i.e. the agreement that
    # sampling noise alone allows (the ceiling for any cheaper estimate of the same quantity).
    variants = {"exact": {}, "exact, other seed": {"seed": 1}, "mc_layers_1": {"layers": 1},
                "adaptive": {"adaptive": (0.02, 4)}, "adaptive, tolerance 0.005": {"adaptive": (0.005, 4)}}
    res = {}
    for name, extra in variants.items():
        outs, secs, passes = [], 0.0, 0
        for i, folder in enumerate(teachers):
            spec = TeacherSpec(name=f"t{i}", model_path=str(folder), labels=tuple(labels[i]), samples=samples,
                               max_length=128, threads=threads, **extra)
            s, stage, parts = stage_seconds(spec, texts)
            secs += s
            passes += stage.passes
            outs.append({"mc_score": np.concatenate([o["mc_score"] for o in parts]),
                         "mc_probs": np.concatenate([np.stack(o["mc_probs"]) for o in parts])})
        q = selection_quality(np.stack([o["mc_score"] for o in outs], 1), [o["mc_probs"] for o in outs],
                              list(space.positions), len(space), gold_idx)
        res[name] = {"seconds": secs, "passes": passes, "pick": selection(outs),
                     "selection_accuracy": q["selection_accuracy"], "supervision_accuracy": q["target_accuracy"]}
    exact = res["exact"]
    out = {}
    for name, r in res.items():
        out[name] = {"seconds": r["seconds"], "passes": r["passes"], "speedup": exact["seconds"] / r["seconds"],
                     "pass_saving": 1 - r["passes"] / exact["passes"],
                     "agreement": float((r["pick"] == exact["pick"]).mean()),
                     "selection_accuracy": r["selection_accuracy"], "supervision_accuracy": r["supervision_accuracy"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=96, help="texts per dataset for the speed runs")
    ap.add_argument("--n-bf16", type=int, default=12, help="texts for bf16 (slow on CPUs without bf16 matmul)")
    ap.add_argument("--n-agree", type=int, default=200, help="BBC pool texts for the agreement runs")
    ap.add_argument("--n-student", type=int, default=256)
    ap.add_argument("--only", choices=["cheaper", "speed", "mask"],
                    help="rerun only the cheaper-estimate agreement runs, only the speed runs (teacher and "
                    "student), or only the mask's cost, into the last full run's results")
    ap.add_argument("--n-mask", type=int, default=32, help="BBC texts per variant of the mask-cost runs")
    ap.add_argument("--n-ablate", type=int, default=32, help="BBC texts per variant of the one-at-a-time ablation")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--teachers", default="runs/reproduce/bbc_news/shared/prepare",
                    help="fine-tuned BBC teachers (t1, t2) from benchmarks/reproduce.py, for the agreement runs")
    args = ap.parse_args()

    import torch

    threads = torch.get_num_threads()
    k = args.samples
    if args.only:  # rerun one part alone, into the last full run's results
        import json

        res = json.loads((RESULTS / "throughput.json").read_text())
        if args.only == "cheaper":
            cheaper(args, res, k, threads)
        elif args.only == "mask":
            mask_cost(args, res, k)
        else:
            res["threads"] = threads
            teacher_speed(args, res, k, threads)
            student_speed(args, res)
        write(res)
        return
    res: dict = {"samples": k, "max_length": 128, "threads": threads, "teacher": {}, "student": {}, "datasets": {}}
    teacher_speed(args, res, k, threads)
    cheaper(args, res, k, threads)
    mask_cost(args, res, k)
    student_speed(args, res)
    write(res)


def teacher_speed(args, res: dict, k: int, threads: int) -> None:
    """Naive vs optimized vs Ray Data, roofline, bf16, the ablation and the profile, into `res`."""
    import ray
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from muki_ray.stages.teachers import TeacherSpec

    t = res["teacher"]
    t["peak_gflops_fp32"] = peak_gflops(torch.float32)
    t["peak_gflops_bf16"] = peak_gflops(torch.bfloat16)
    data = {"bbc_news": texts_of("bbc_news", args.n), "20newsgroups": texts_of("20newsgroups", args.n)}
    data["bbc_first_sentence"] = first_sentences(data["bbc_news"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = minilm_classifier(Path(tmp) / "teacher", list(LABELS))
        hf = AutoConfig.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        spec = TeacherSpec(name="teacher", model_path=str(folder), labels=LABELS, samples=k, max_length=128,
                           threads=threads)
        for name, texts in data.items():
            lengths = np.array([len(x) for x in tok(texts, truncation=True, max_length=128)["input_ids"]])
            flops = flops_per_example(lengths, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers).sum()
            naive_s = naive_loop(folder, texts, k)
            opt_s, stage, _ = stage_seconds(spec, texts)
            d = {"texts": len(texts), "mean_tokens": float(lengths.mean()), "naive_eps": len(texts) / naive_s,
                 "optimized_eps": len(texts) / opt_s, "attn_implementation": stage.model.config._attn_implementation}
            d["optimized_vs_naive"] = naive_s / opt_s
            # (K + 1) forwards per example: the deterministic pass and the K samples.
            d["gflops_fp32"] = flops * (k + 1) / opt_s / 1e9
            d["roofline_fraction_fp32"] = d["gflops_fp32"] / t["peak_gflops_fp32"]
            res["datasets"][name] = d
            print(name, d, flush=True)
        bbc = res["datasets"]["bbc_news"]
        # bf16 on a few texts: CPUs without native bf16 matmul run it far slower.
        few = data["bbc_news"][:args.n_bf16]
        lengths = np.array([len(x) for x in tok(few, truncation=True, max_length=128)["input_ids"]])
        bf16_s = stage_seconds(replace(spec, precision="bf16"), few)[0]
        fp32_few_s = stage_seconds(spec, few)[0]
        flops = flops_per_example(lengths, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers).sum()
        t["bf16_vs_fp32"] = fp32_few_s / bf16_s
        t["gflops_bf16"] = flops * (k + 1) / bf16_s / 1e9
        t["roofline_fraction_bf16"] = t["gflops_bf16"] / t["peak_gflops_bf16"]
        t["naive_eps"], t["optimized_eps"] = bbc["naive_eps"], bbc["optimized_eps"]
        t["ablation"] = {name: ablation(folder, data[name][:args.n_ablate], k)
                         for name in ("bbc_news", "bbc_first_sentence")}
        res["profile_fp32"] = profile_top_ops(spec, data["bbc_news"][:16])
        t["roofline_fraction_fp32"] = bbc["roofline_fraction_fp32"]

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
        texts = data["bbc_news"]
        t["ray_eps_1actor"] = len(texts) / ray_seconds(spec, texts, 1)
        t["ray_eps_2actors"] = len(texts) / ray_seconds(spec, texts, 2)
        t["ray_vs_optimized"] = max(t["ray_eps_1actor"], t["ray_eps_2actors"]) / t["optimized_eps"]
        ray.shutdown()


def cheaper(args, res: dict, k: int, threads: int) -> None:
    """mc.layers and adaptive K against exact MC on the fine-tuned BBC teachers, into `res`."""
    from transformers import AutoConfig

    t = res["teacher"]
    teachers = [Path(args.teachers) / n for n in ("t1", "t2")]
    if all((p / "config.json").exists() for p in teachers):
        from muki_ray.config.schema import Source
        from common import table

        pool = table(Source(source="bbc_news", split="train", part=(0.5, 1.0), limit=args.n_agree))
        labels = [list(AutoConfig.from_pretrained(p).id2label.values()) for p in teachers]
        cheap = cheaper_estimates(teachers, labels, pool.column("text").to_pylist(), pool.column("label").to_pylist(),
                                  k, threads)
        res["cheaper_estimates"] = cheap
        t["mc_layers_speedup"] = cheap["mc_layers_1"]["speedup"]
        t["mc_layers_agreement"] = cheap["mc_layers_1"]["agreement"]
        t["adaptive_k_pass_saving"] = cheap["adaptive"]["pass_saving"]
        t["adaptive_k_agreement"] = cheap["adaptive"]["agreement"]
        t["adaptive_k_speedup"] = cheap["adaptive"]["speedup"]
        t["exact_other_seed_agreement"] = cheap["exact, other seed"]["agreement"]
    else:
        print(f"no fine-tuned teachers under {args.teachers}: run benchmarks/reproduce.py --dataset bbc_news first; "
              "the mc.layers and adaptive-K agreement runs are skipped", flush=True)


def mask_cost(args, res: dict, k: int, reps: int = 3) -> None:
    """Seconds of the K passes over BBC texts with each way of masking, interleaved, best of `reps`, into `res`:
    at 1 torch thread (a CPU teacher actor's default: `threads` = ceil(num_cpus) = 1) and at this machine's
    default. The mask's cost is (seconds with it - seconds with no mask) / seconds with no mask.
    """
    import torch

    from muki_ray.method import mc_dropout
    from muki_ray.core.hf_folder import load_classifier, load_tokenizer

    engine = mc_dropout._seeded_mask

    def hashes(x, seeds, index):  # one splitmix64 per element: the masks' stream before the 16-bit lanes
        z = mc_dropout._module_key(seeds, index, x.dim()) + mc_dropout._position_hash(x.shape, x.device)
        return mc_dropout._lsr(mc_dropout.splitmix64(z), 40)

    def before(x, p, seeds, index):  # as the engine computed it before #36: every position hashed per call
        mc_dropout._POSITIONS.clear()
        return x * (hashes(x, seeds, index) >= math.ceil(p * (1 << 24))).to(x.dtype) / (1.0 - p)

    def per_element(x, p, seeds, index):  # the engine before the lanes: positions cached, in place, 2 of 3 steps
        z = mc_dropout._module_key(seeds, index, x.dim(), add=mc_dropout._GOLDEN) + \
            mc_dropout._position_hash(x.shape, x.device)
        shifted = torch.empty_like(z)
        for bits, mult in ((30, mc_dropout._MIX1), (27, mc_dropout._MIX2)):
            torch.bitwise_right_shift(z, bits, out=shifted)
            shifted &= (1 << (64 - bits)) - 1
            z ^= shifted
            z *= mult
        z ^= -(1 << 63)
        return (x * (z >= (math.ceil(p * (1 << 24)) << 40) - (1 << 63))).div_(1.0 - p)

    variants = {"engine (seeded, per row)": engine, "one hash per element (cached)": per_element,
                "before (one hash per element, uncached)": before,
                "torch dropout (unseeded)": lambda x, p, seeds, index: torch.nn.functional.dropout(x, p),
                "no mask": lambda x, p, seeds, index: x}
    texts = texts_of("bbc_news", args.n_mask)
    default_threads = torch.get_num_threads()
    res["mask"] = {"texts": len(texts), "by_threads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = minilm_classifier(Path(tmp) / "teacher", list(LABELS))
        tok, model = load_tokenizer(folder), load_classifier(folder).eval()
        batches = [dict(tok(texts[i:i + 8], truncation=True, max_length=128, padding=True, return_tensors="pt"))
                   for i in range(0, len(texts), 8)]
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            secs = {name: float("inf") for name in variants}
            try:
                for rep in range(reps + 1):  # the first round warms up
                    for name, mask in variants.items():
                        mc_dropout._seeded_mask = mask
                        t0 = time.perf_counter()
                        for batch in batches:
                            mc_dropout.mc_predict(model, batch, samples=k)
                        if rep:
                            secs[name] = min(secs[name], time.perf_counter() - t0)
            finally:
                mc_dropout._seeded_mask = engine
                torch.set_num_threads(default_threads)
            none = secs["no mask"]
            res["mask"]["by_threads"][str(threads)] = {
                "seconds": secs, "cost": {name: (s - none) / none for name, s in secs.items()}}
    res["teacher"]["mask_cost"] = res["mask"]["by_threads"]["1"]["cost"]["engine (seeded, per row)"]
    print("mask", res["mask"], flush=True)


def student_speed(args, res: dict) -> None:
    """Ray Train + DeepSpeed vs a plain loop, steady-state examples/s, into `res`."""
    import ray

    from student_throughput import plain_loop, ray_run

    from muki_ray.core.hf_folder import resolve_model_path

    base = str(resolve_model_path("builtin:minilm-l6"))
    stexts = texts_of("bbc_news", args.n_student)
    targets = np.random.default_rng(0).dirichlet(np.ones(5), size=len(stexts))
    res["student"]["plain_eps"] = plain_loop(base, stexts, targets, 16, bf16=False)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        m = ray_run(base, stexts, targets, Path(tmp), workers=1, zero=0, bf16=False, batch=16)
    ray.shutdown()
    res["student"]["ray_deepspeed_eps"] = m["examples_per_s_steady"]
    res["student"]["ray_deepspeed_eps_with_first_step"] = m["examples_per_s"]
    res["student"]["ratio"] = res["student"]["ray_deepspeed_eps"] / res["student"]["plain_eps"]


def write(res: dict) -> None:
    import json

    t, s = res["teacher"], res["student"]
    goals = [
        ("Ray stage / optimized in-process", t["ray_vs_optimized"], 0.9),
        ("optimized / naive (BBC)", res["datasets"]["bbc_news"]["optimized_vs_naive"], 1.4),
        ("roofline fraction fp32", t["roofline_fraction_fp32"], 0.6),
        ("roofline fraction bf16", t["roofline_fraction_bf16"], 0.6),
        ("mc.layers=1 speedup", t.get("mc_layers_speedup", float("nan")), 3.0),
        ("mc.layers=1 agreement", t.get("mc_layers_agreement", float("nan")), 0.98),
        ("adaptive K pass saving", t.get("adaptive_k_pass_saving", float("nan")), 0.40),
        ("adaptive K agreement", t.get("adaptive_k_agreement", float("nan")), 0.99),
        ("student Ray+DeepSpeed / plain", s["ratio"], 0.85),
    ]
    at_most = [("seeded mask / forward, 1 thread (at most)", t.get("mask_cost", float("nan")), 0.10)]
    res["goals"] = ([{"what": w, "measured": v, "goal": g, "met": bool(v >= g)} for w, v, g in goals]
                    + [{"what": w, "measured": v, "goal": g, "met": bool(v <= g)} for w, v, g in at_most])
    res["hardware"] = hardware()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(res, indent=2))
    md = [f"# Throughput (K={res['samples']}, max length 128, {res['threads']} threads; {hardware()})", "",
          speed_table(res)]
    md += ["", f"Peak matmul: fp32 {t['peak_gflops_fp32']:.1f} GFLOP/s, bf16 {t['peak_gflops_bf16']:.1f} GFLOP/s. "
           f"bf16 autocast: {t['gflops_bf16']:.1f} GFLOP/s ({t['roofline_fraction_bf16']:.2f} of the bf16 peak), "
           f"{t['bf16_vs_fp32']:.2f}x fp32 speed.",
           f"Ray Data stage (BBC): 1 actor {t['ray_eps_1actor']:.2f} ex/s, 2 actors {t['ray_eps_2actors']:.2f} ex/s; "
           f"in-process optimized {t['optimized_eps']:.2f} ex/s.",
           f"Student: plain loop {s['plain_eps']:.2f} ex/s, Ray Train + DeepSpeed ZeRO-0 {s['ray_deepspeed_eps']:.2f} "
           f"ex/s steady state ({s['ray_deepspeed_eps_with_first_step']:.2f} counting the first step)."]
    md += ["", "Each optimization switched off on its own (fp32, best of 2 interleaved runs; slowdown > 1 means "
           "the optimization helps):", "", ablation_table(res)]
    md += ["", "Where the time goes (torch.profiler, optimized stage, fp32, 16 BBC texts):", "", "```",
           res["profile_fp32"].rstrip(), "```"]
    if "cheaper_estimates" in res:
        md += ["", cheaper_table(res)]
        if "exact_other_seed_agreement" in t:
            md += ["", f"Sampling noise alone: exact MC with other dropout masks picks the same teacher for "
                   f"{t['exact_other_seed_agreement']:.3f} of the rows, the ceiling for any estimate of p̄."]
    if "by_threads" in res.get("mask", {}):
        m = res["mask"]
        md += ["", f"The dropout mask's cost ({m['texts']} BBC texts, best of 3 interleaved runs): seconds of the "
               "deterministic pass and the K passes, and the cost over no mask. A CPU teacher actor runs 1 torch "
               "thread by default.", "",
               "| mask | " + " | ".join(f"{t} thread(s): s | cost" for t in m["by_threads"]) + " |",
               "|---" * (1 + 2 * len(m["by_threads"])) + "|"]
        for name in next(iter(m["by_threads"].values()))["seconds"]:
            md.append(f"| {name} | " + " | ".join(f"{b['seconds'][name]:.2f} | {b['cost'][name]:+.3f}"
                                                 for b in m["by_threads"].values()) + " |")
    md += ["", goals_table(res)]
    headline = "; ".join(f"{g['what']} {g['measured']:.2f} (goal {g['goal']})" for g in res["goals"])
    md += ["", headline]
    (RESULTS / "throughput.md").write_text("\n".join(md) + "\n")
    print(headline)


def speed_table(res: dict) -> str:
    """Exact MC per text set: naive vs optimized examples/s, and the optimized stage's share of the fp32 peak."""
    md = ["| text | mean tokens | naive ex/s | optimized ex/s | optimized / naive | GFLOP/s fp32 | roofline fp32 |",
          "|---|---|---|---|---|---|---|"]
    for name, d in res["datasets"].items():
        md.append(f"| {name} | {d['mean_tokens']:.0f} | {d['naive_eps']:.2f} | {d['optimized_eps']:.2f} | "
                  f"{d['optimized_vs_naive']:.2f} | {d['gflops_fp32']:.1f} | {d['roofline_fraction_fp32']:.2f} |")
    return "\n".join(md)


def ablation_table(res: dict) -> str:
    """Each optimization switched off on its own: seconds and slowdown per text set."""
    ablation = res["teacher"]["ablation"]
    md = ["| variant | " + " | ".join(f"{d} s | {d} slowdown" for d in ablation) + " |",
          "|---" * (1 + 2 * len(ablation)) + "|"]
    for name in next(iter(ablation.values())):
        md.append(f"| {name} | " + " | ".join(f"{a[name]['seconds']:.1f} | {a[name]['slowdown']:.2f}"
                                              for a in ablation.values()) + " |")
    return "\n".join(md)


def cheaper_table(res: dict) -> str:
    """The cheaper MC estimates against exact MC: time, speedup, passes saved, agreement, selection."""
    md = ["| estimate | teacher-stage s | speedup | passes saved | same teacher as exact | selection acc "
          "| supervision acc |", "|---|---|---|---|---|---|---|"]
    for name, c in res["cheaper_estimates"].items():
        md.append(f"| {name} | {c['seconds']:.1f} | {c['speedup']:.2f} | {c['pass_saving']:.2f} | "
                  f"{c['agreement']:.3f} | {c['selection_accuracy']:.3f} | {c['supervision_accuracy']:.3f} |")
    return "\n".join(md)


def goals_table(res: dict) -> str:
    """The issue's goals: measured, target, met."""
    md = ["| goal | measured | target | met |", "|---|---|---|---|"]
    return "\n".join(md + [f"| {g['what']} | {g['measured']:.3f} | {g['goal']} | {'yes' if g['met'] else 'no'} |"
                            for g in res["goals"]])


def render(result: dict) -> str:
    """The docs' tables for results/throughput.json: speed, the ablation, the cheaper estimates, the goals."""
    parts = [speed_table(result), ablation_table(result)]
    if "cheaper_estimates" in result:
        parts.append(cheaper_table(result))
    return "\n\n".join(parts + [goals_table(result)])


if __name__ == "__main__":
    main()
