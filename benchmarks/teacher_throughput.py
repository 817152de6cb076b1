"""Teacher stage throughput: the Ray Data stage vs a plain in-process loop, same model and settings.

MiniLM-L6 on real BBC text, K=8, max length 128, fp32. Writes results/teacher_throughput.{json,md}
and prints the ratio last. Usage: python benchmarks/teacher_throughput.py [--n 192]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bbc_texts, minilm_classifier, timed, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=192, help="texts")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch

    from muki_ray.data import to_ray_dataset
    from muki_ray.teachers import TeacherSpec, TeacherStage, stage_class

    texts = bbc_texts(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        folder = minilm_classifier(Path(tmp) / "teacher", ["business", "entertainment", "politics"])
        threads = torch.get_num_threads()
        spec = TeacherSpec(name="teacher", model_path=str(folder), labels=("business", "entertainment", "politics"),
                           samples=args.samples, max_length=128, threads=threads)

        # In-process loop: the same stage class, called directly on the same batches.
        stage = TeacherStage(spec)
        stage.predict(texts[:4])  # warm-up
        _, t_plain = timed(lambda: [stage.predict(texts[i:i + args.batch]) for i in range(0, len(texts), args.batch)])
        del stage

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
        import pyarrow as pa

        table = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts})

        def run_ray():
            ds = to_ray_dataset(table, args.batch).map_batches(
                stage_class("teacher"), fn_constructor_kwargs={"spec": spec}, batch_size=args.batch,
                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
            return ds.materialize()

        run_ray()  # warm-up: actor start and model load are one-off costs, reported separately
        out, t_ray = timed(run_ray)
        assert out.count() == len(texts)
        ray.shutdown()

    plain_eps = len(texts) / t_plain
    ray_eps = len(texts) / t_ray
    ratio = ray_eps / plain_eps
    headline = (f"Ray Data stage {ray_eps:.2f} ex/s vs in-process {plain_eps:.2f} ex/s: "
                f"ratio {ratio:.2f} (K={args.samples}, {threads} threads)")
    write_results("teacher_throughput",
                  {"n": len(texts), "samples": args.samples, "max_length": 128, "batch": args.batch,
                   "threads": threads, "plain_eps": plain_eps, "ray_eps_1actor": ray_eps, "ratio": ratio,
                   "forward_examples_per_s_plain": plain_eps * (args.samples + 1)},
                  [("path", "examples/s", "forward passes/s"),
                   ("in-process loop", f"{plain_eps:.2f}", f"{plain_eps * (args.samples + 1):.1f}"),
                   ("Ray Data stage, 1 actor", f"{ray_eps:.2f}", f"{ray_eps * (args.samples + 1):.1f}")],
                  headline)
    print(headline)


if __name__ == "__main__":
    main()
