"""Where and in what precision a model runs for inference: the `auto` choices, and refusing the senseless ones."""

from __future__ import annotations

import torch

from foundry.core.errors import UserError
from foundry.hub.device import resolve_device  # noqa: F401 (the engine's callers resolve here)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def cpu_capability() -> str:
    """What this CPU offers torch's kernels, as printed beside every benchmark figure: the dispatch level (AVX2,
    AVX512, ...), native bf16 and AMX."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return (f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {'yes' if cpu_has_native_bf16() else 'no'}, "
            f"AMX {'yes' if amx else 'no'}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively (NVIDIA compute capability 8.0+, recent AMD)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str, device: torch.device, stored: torch.dtype | None = None
                  ) -> tuple[torch.dtype, str | None]:
    """The dtype to run in for `--dtype name` on `device`, and a warning to show (None when all is well).

    stored: the checkpoint's dtype, which `auto` follows when it is 16-bit and the device computes in it."""
    if name not in DTYPE_CHOICES:
        raise UserError(f"--dtype {name!r} is not a choice; use {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        if device.type != "cuda":
            # A bf16 checkpoint stays bf16 where the CPU computes bf16 in hardware (half the bytes a token
            # reads, nothing lost); anything else runs in fp32, exact and fastest without native bf16.
            native = stored == torch.bfloat16 and device.type == "cpu" and cpu_has_native_bf16()
            return (torch.bfloat16 if native else torch.float32), None
        if stored == torch.float16:
            return torch.float16, None
        # bf16 halves memory and bandwidth and keeps fp32's range, so an fp32 checkpoint loses nothing visible;
        # without bf16, fp32 (fp16 could overflow where a bf16-trained model does not).
        return (torch.bfloat16 if gpu_has_bf16(device) else torch.float32), None
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not gpu_has_bf16(device):
        raise UserError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 arithmetic "
                        "(it needs compute capability 8.0+); use --dtype fp16 or fp32")
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        raise UserError("--dtype bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 would be "
                        "emulated, many times slower than fp32; use --dtype fp32, or --quantize int8 to save memory")
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--dtype fp16 runs on GPUs only: CPU fp16 kernels are slow or missing; use fp32 or bf16")
    return dtype, None
