"""Choosing the device and dtype an inference engine runs in: `auto`, and refusing what makes no sense."""

import pytest
import torch

from foundry.core.errors import UserError
from foundry.infer import device
from foundry.infer.device import resolve_device, resolve_dtype

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """Pretend there is one CUDA GPU; the test sets whether it has bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")

    def with_bf16(supported: bool) -> None:
        monkeypatch.setattr(device, "gpu_has_bf16", lambda where: supported)
    return with_bf16


def test_auto_device_is_a_gpu_when_there_is_one(monkeypatch, gpu):
    assert resolve_device("auto") == GPU
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserError, match="has 1 CUDA GPU"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(UserError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(UserError, match="only cpu and cuda"):
        resolve_device("meta")


def test_auto_dtype_on_a_cpu_is_fp32_but_keeps_a_bf16_checkpoint_where_bf16_is_native(monkeypatch):
    for native in (False, True):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
        for stored in (None, torch.float32, torch.float16):
            assert resolve_dtype("auto", CPU, stored) == (torch.float32, None)
        assert resolve_dtype("auto", CPU, torch.bfloat16) == (torch.bfloat16 if native else torch.float32, None)


def test_auto_dtype_on_a_gpu(gpu):
    gpu(True)
    assert resolve_dtype("auto", GPU, torch.float32)[0] == torch.bfloat16
    assert resolve_dtype("auto", GPU, torch.bfloat16)[0] == torch.bfloat16
    assert resolve_dtype("auto", GPU, torch.float16)[0] == torch.float16
    gpu(False)
    assert resolve_dtype("auto", GPU, torch.bfloat16)[0] == torch.float32  # fp16 could overflow a bf16 model


def test_bf16_is_refused_on_a_gpu_or_a_cpu_without_it(gpu, monkeypatch):
    gpu(False)
    with pytest.raises(UserError, match="Tesla V100 has no bf16"):
        resolve_dtype("bf16", GPU)
    gpu(True)
    assert resolve_dtype("bf16", GPU) == (torch.bfloat16, None)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(UserError, match="no bf16 instructions .* would be emulated"):
        resolve_dtype("bf16", CPU)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("bf16", CPU) == (torch.bfloat16, None)


def test_fp16_only_on_a_gpu_and_unknown_names_refused(gpu):
    assert resolve_dtype("fp16", GPU) == (torch.float16, None)
    with pytest.raises(UserError, match="GPUs only"):
        resolve_dtype("fp16", CPU)
    with pytest.raises(UserError, match="not a choice"):
        resolve_dtype("float8", CPU)
    assert resolve_dtype("fp32", GPU) == (torch.float32, None)


def test_the_cpu_capability_line_names_the_dispatch_level_and_agrees_on_bf16():
    from foundry.infer.device import cpu_capability, cpu_has_native_bf16

    line = cpu_capability()
    assert line.startswith(torch.backends.cpu.get_cpu_capability())
    assert f"native bf16 {'yes' if cpu_has_native_bf16() else 'no'}" in line and "AMX " in line
