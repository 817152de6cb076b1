"""Device/precision/backend selection: mock the GPU query, not the math."""

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
