"""Student throughput: Ray Train + DeepSpeed (1 worker, ZeRO-0) vs a plain single-process torch loop.

MiniLM-L6 on real BBC text, max length 128, batch 16, AdamW, fp32 and bf16; plus peak resident
memory per worker at ZeRO-0 and ZeRO-3 with 2 workers. Writes results/student_throughput.{json,md}
and prints the ratio last. Usage: python benchmarks/student_throughput.py [--n 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bbc_texts, markdown_table, write_results  # noqa: E402

LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def plain_loop(model_path: str, texts: list[str], targets, batch: int, bf16: bool) -> float:
    """Examples/s of a plain torch loop: same model, batch, optimizer and loss."""
    import torch

    from muki_ray.core.hf_folder import load_classifier, load_tokenizer
    from muki_ray.method.losses import WeightedKLLoss

    tok = load_tokenizer(model_path)
    model = load_classifier(model_path, num_labels=len(LABELS), ignore_mismatched_sizes=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    loss_fn = WeightedKLLoss()
    t = torch.tensor(targets, dtype=torch.float32)
    steps = len(texts) // batch

    def step(i):
        enc = tok(texts[i * batch:(i + 1) * batch], truncation=True, max_length=128, padding=True, return_tensors="pt")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**enc).logits.float()
        loss = loss_fn(logits, {"target": t[i * batch:(i + 1) * batch]})
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step(0)  # warm-up, as the Ray run's first step is inside its timing too but amortized
    t0 = time.perf_counter()
    for i in range(1, steps):
        step(i)
    return (steps - 1) * batch / (time.perf_counter() - t0)


def ray_run(model_path: str, texts, targets, run_dir: Path, *, workers: int, zero: int, bf16: bool,
            batch: int) -> dict:
    import pyarrow as pa

    from muki_ray.config.schema import TrainHyper
    from muki_ray.data.sources import to_ray_dataset
    from muki_ray.student.training import TrainJob, deepspeed_config, fit, steps_per_epoch, tokenize

    hyper = TrainHyper(epochs=1, batch_size=batch, zero_stage=zero, num_workers=workers,
                       precision="bf16" if bf16 else "fp32", warmup_ratio=0.1,
                       resources_per_worker={"CPU": 2 / workers - 0.25})
    per_epoch = steps_per_epoch(len(texts), workers, batch)
    table = pa.table({"text": texts, "target": [list(t) for t in targets[:len(texts)]], "weight": [1.0] * len(texts)})
    dev = pa.table({"text": texts[:16], "gold": [0] * 16})
    job = TrainJob(model_path=model_path, labels=LABELS, loss="WeightedKLLoss", hyper=hyper.model_dump(),
                   ds_config=deepspeed_config(hyper, use_gpu=False, bf16=bf16, total_steps=per_epoch),
                   steps_per_epoch=per_epoch, log_path=str(run_dir / "train_log.jsonl"),
                   part_labels={"all": list(range(len(LABELS)))})
    result = fit(job, tokenize(to_ray_dataset(table), model_path, 128).materialize(),
                 tokenize(to_ray_dataset(dev), model_path, 128).materialize(),
                 run_dir=run_dir, name=f"bench-{workers}-{zero}-{int(bf16)}", num_rows=len(texts),
                 scaling={"num_workers": workers, "use_gpu": False,
                          "resources_per_worker": dict(hyper.resources_per_worker)},
                 max_failures=0)
    return result["last_metrics"]


def table_rows(res: dict) -> list[tuple]:
    """Examples/s of the plain loop and of Ray Train + DeepSpeed (fp32, bf16), and peak RSS per worker."""
    return [
        ("run", "examples/s", "peak RSS per worker (MiB)"),
        ("plain loop fp32", f"{res['plain_fp32_eps']:.2f}", f"{res['plain_peak_rss_mb']:.0f} (process)"),
        ("plain loop bf16", f"{res['plain_bf16_eps']:.2f}", ""),
        ("Ray Train + DeepSpeed ZeRO-0, 1 worker, fp32", f"{res['ray_fp32_eps']:.2f}", ""),
        ("Ray Train + DeepSpeed ZeRO-0, 1 worker, bf16", f"{res['ray_bf16_eps']:.2f}", ""),
        ("ZeRO-0, 2 workers", "", f"{res['peak_rss_mb_per_worker_zero0_2w']:.0f}"),
        ("ZeRO-3, 2 workers", "", f"{res['peak_rss_mb_per_worker_zero3_2w']:.0f}"),
    ]


def render(result: dict) -> str:
    """The docs' table for results/student_throughput.json."""
    return markdown_table(table_rows(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--n-bf16", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch

    from muki_ray.core.hf_folder import resolve_model_path

    model_path = str(resolve_model_path("builtin:minilm-l6"))
    texts = bbc_texts(args.n)
    rng = np.random.default_rng(0)
    targets = rng.dirichlet(np.ones(len(LABELS)), size=len(texts))
    res: dict = {"n": args.n, "n_bf16": args.n_bf16, "batch": args.batch, "threads": torch.get_num_threads()}
    res["plain_fp32_eps"] = plain_loop(model_path, texts, targets, args.batch, bf16=False)
    res["plain_bf16_eps"] = plain_loop(model_path, texts[:args.n_bf16], targets, args.batch, bf16=True)
    res["plain_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        m = ray_run(model_path, texts, targets, Path(tmp) / "a", workers=1, zero=0, bf16=False, batch=args.batch)
        res["ray_fp32_eps"] = m["examples_per_s"]
        m = ray_run(model_path, texts[:args.n_bf16], targets, Path(tmp) / "b", workers=1, zero=0, bf16=True,
                    batch=args.batch)
        res["ray_bf16_eps"] = m["examples_per_s"]
        small = texts[:64]
        m0 = ray_run(model_path, small, targets, Path(tmp) / "c", workers=2, zero=0, bf16=False, batch=8)
        m3 = ray_run(model_path, small, targets, Path(tmp) / "d", workers=2, zero=3, bf16=False, batch=8)
        res["peak_rss_mb_per_worker_zero0_2w"] = m0["peak_rss_mb"]
        res["peak_rss_mb_per_worker_zero3_2w"] = m3["peak_rss_mb"]
    ray.shutdown()
    res["ratio_fp32"] = res["ray_fp32_eps"] / res["plain_fp32_eps"]
    res["ratio_bf16"] = res["ray_bf16_eps"] / res["plain_bf16_eps"]
    headline = (f"Ray Train + DeepSpeed / plain loop: fp32 {res['ratio_fp32']:.2f} "
                f"({res['ray_fp32_eps']:.2f} vs {res['plain_fp32_eps']:.2f} ex/s), bf16 {res['ratio_bf16']:.2f} "
                f"({res['ray_bf16_eps']:.2f} vs {res['plain_bf16_eps']:.2f} ex/s)")
    write_results("student_throughput", res, table_rows(res), headline)
    print(json.dumps(res, indent=1))
    print(headline)


if __name__ == "__main__":
    main()
