"""Device/precision/backend selection: mock the GPU query, not the math."""

import ray
import torch

from muki_ray import hardware


def test_cpu_when_no_gpu_assigned(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.pick_device(gpu_ids=[]) == torch.device("cpu")


def test_cuda_and_bf16_when_a_gpu_is_reported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    dev = hardware.pick_device(gpu_ids=["0"])
    assert dev.type == "cuda"
    assert hardware.autocast_dtype("auto", dev) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
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
