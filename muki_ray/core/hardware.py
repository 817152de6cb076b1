"""Device, precision and collective backend, chosen from what the process was given.

The same code runs on a laptop CPU and on 8 nodes x 8 GPUs: GPUs come from Ray's assignment
(`num_gpus` in the config), bf16/fp16 from the device, NCCL vs gloo from `use_gpu`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

import torch


def pick_device(gpu_ids: Optional[list] = None) -> torch.device:
    """CUDA when this process was assigned a GPU (Ray sets CUDA_VISIBLE_DEVICES) and CUDA works, else CPU."""
    if gpu_ids is None:
        try:
            import ray

            gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        except Exception:  # outside a Ray worker
            gpu_ids = []
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray remaps the assigned GPU to index 0
    return torch.device("cpu")


def actor_device(threads: int) -> torch.device:
    """pick_device() for an inference actor; on CPU also use `threads` intra-op threads.

    Ray pins OMP_NUM_THREADS to 1 for fractional-CPU actors; the configured count wins.
    """
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    return device


def native_bf16() -> bool:
    """Whether this process's GPU computes bf16 natively (Ampere and later). Pre-Ampere cards report
    bf16 as supported through emulation, which is slow or fails; they count as not supporting it."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without the argument
        return bool(torch.cuda.is_bf16_supported())


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for `precision` in {auto, fp32, bf16, fp16} on `device`; None means fp32.

    `auto`: bf16 on GPUs that compute it natively, else fp16 on GPU; fp32 on CPU (CPU bf16 is
    opt-in with `bf16`, since its speed depends on the CPU's bf16 matmul support).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 autocast needs a GPU; use bf16 or fp32 on CPU")
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16() else torch.float16
        return None
    raise ValueError(f"unknown precision {precision!r}")


def student_bf16(precision: str, device: torch.device) -> tuple[bool, Optional[str]]:
    """Whether the student trains in bf16, and the one line to log when the choice is not the one asked.

    `auto`: bf16 on a GPU that computes it natively, else fp32 (fp16 would need a loss scaler, and
    fp32 is what the student was tuned in). `bf16` is kept where asked, with a line when the card
    only emulates it.
    """
    if precision == "fp32":
        return False, None
    on_gpu = device.type == "cuda"
    if precision == "auto":
        if on_gpu and not native_bf16():
            return False, "student: precision auto: this GPU has no native bf16, training in fp32"
        return on_gpu, None
    if precision == "bf16":
        if on_gpu and not native_bf16():
            return True, "student: precision bf16 on a GPU without native bf16: emulated, expect it to be slow"
        return True, None
    raise ValueError(f"unknown precision {precision!r}")


def mc_batch_tokens(device: torch.device) -> int:
    """Default `mc.max_batch_tokens` (rows x samples x tokens per forward) on `device`.

    CPU: 2048, i.e. about one 128-token row's K=16 samples per forward; on 2 cores this ran
    1.49x faster than one large B*K forward (activations stay in cache; benchmarks/throughput.py).
    GPU: 65536, large enough to fill the device with the batched B*K forward.
    """
    return 65536 if device.type == "cuda" else 2048


def worker_threads() -> int:
    """torch intra-op threads for this Ray worker: ceil(its assigned CPUs), at least 1.

    Ray pins OMP_NUM_THREADS to int(CPU) (1 for a fractional share like 1.75); read what Ray
    actually assigned, so threads and the scheduled CPU share come from one place.
    """
    import math

    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # not inside a Ray worker
        cpus = 1.0
    return max(1, math.ceil(cpus))


def collective_backend(use_gpu: bool) -> str:
    """NCCL between GPU workers, gloo between CPU workers."""
    return "nccl" if use_gpu else "gloo"


_gpu_default: dict[str, float] = {}


def gpu_default(autoscaling: bool = False) -> float:
    """num_gpus of an actor whose config leaves it unset (teachers, embedding, evaluation, refine):
    1 where the cluster has GPUs, or, when it autoscales, where a node type it may add has one; else 0.

    Decided once per cluster and driver process, so every stage of a run agrees, whatever nodes
    happen to be up when a stage starts (GPU pods at 0 would otherwise send a stage to the head's CPUs).
    """
    import ray

    from muki_ray.core.cluster import node_types

    key = f"{ray.get_runtime_context().gcs_address}:{autoscaling}"
    if key not in _gpu_default:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        if autoscaling and not gpus:
            gpus = any(t.get("GPU", 0) > 0 for t in node_types() or [])
        _gpu_default[key] = 1.0 if gpus else 0.0
    return _gpu_default[key]


def release_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the OS (mallopt: a fixed 128 KiB mmap threshold,
    trimming above 128 KiB). By default it raises the threshold as big blocks are freed, and then
    keeps tensors' freed memory in its heap: a training worker's resident memory only grows (measured
    on a 335 M ZeRO-3 student: 7.4 GB resident after 3 steps, against 3.8 GB with this). A no-op
    where the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 128 * 1024)
    mallopt(m_trim_threshold, 128 * 1024)
