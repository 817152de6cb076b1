"""Device/precision/backend selection: mock the GPU query, not the math."""

import ray
import torch

from muki_ray.core import hardware


def test_cpu_when_no_gpu_assigned(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.pick_device(gpu_ids=[]) == torch.device("cpu")


def test_cuda_and_bf16_when_a_gpu_is_reported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    dev = hardware.pick_device(gpu_ids=["0"])
    assert dev.type == "cuda"
    assert hardware.autocast_dtype("auto", dev) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert hardware.autocast_dtype("auto", dev) is torch.float16  # e.g. V100


def test_cpu_precisions():
    cpu = torch.device("cpu")
    assert hardware.autocast_dtype("auto", cpu) is None
    assert hardware.autocast_dtype("bf16", cpu) is torch.bfloat16
    try:
        hardware.autocast_dtype("fp16", cpu)
    except ValueError as e:
        assert "fp16 autocast needs a GPU" in str(e)
    else:
        raise AssertionError("fp16 on CPU must be refused")


def test_backend():
    assert hardware.collective_backend(True) == "nccl"
    assert hardware.collective_backend(False) == "gloo"


def test_mc_batch_tokens_by_device():
    # CPU: about one 128-token row's 16 samples per forward; GPU: one large B*K forward.
    assert hardware.mc_batch_tokens(torch.device("cpu")) == 2048
    assert hardware.mc_batch_tokens(torch.device("cuda", 0)) == 65536


def test_worker_threads_follow_the_cpus_ray_assigned(monkeypatch):
    class Context:
        def __init__(self, cpus):
            self.cpus = cpus

        def get_assigned_resources(self):
            return {"CPU": self.cpus} if self.cpus is not None else {}

    for cpus, threads in [(1.75, 2), (0.5, 1), (4.0, 4), (None, 1)]:
        monkeypatch.setattr(ray, "get_runtime_context", lambda c=cpus: Context(c))
        assert hardware.worker_threads() == threads


def test_the_makefile_leaves_deepspeed_to_find_its_accelerator():
    """`make demo` on a GPU workstation must not force DeepSpeed onto its CPU accelerator: the
    Makefile sets no DS_ACCELERATOR (DeepSpeed picks cuda where CUDA works, cpu elsewhere)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run(["make", "-s", "-f", "Makefile", "--eval", "show-env: ; @echo \"[$$DS_ACCELERATOR]\"",
                          "show-env"], cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_student_precision_follows_native_bf16(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert hardware.student_bf16("fp32", gpu) == (False, None)
    assert hardware.student_bf16("auto", cpu) == (False, None)
    assert hardware.student_bf16("bf16", cpu) == (True, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.student_bf16("auto", gpu) == (True, None)
    # A pre-Ampere card: bf16 only through emulation.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    bf16, note = hardware.student_bf16("auto", gpu)
    assert not bf16 and "no native bf16, training in fp32" in note
    bf16, note = hardware.student_bf16("bf16", gpu)
    assert bf16 and "emulated" in note
    assert hardware.autocast_dtype("auto", gpu) is torch.float16
