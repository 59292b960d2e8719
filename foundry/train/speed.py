"""Speed settings that must stay numerically honest, and the matmul peak that MFU is measured against."""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (where oneDNN's 'medium' fp32 matmul silently computes in bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown CPU: assume the unsafe case
    return "amx_bf16" in flags or "amx_tile" in flags


def configure_fp32_matmul(mode: str, device: torch.device) -> bool:
    """Route CPU fp32 matmuls to oneDNN's AVX-512 kernel when that stays fp32-exact; True if enabled.

    On CPUs without AMX, precision "medium" only changes the kernel (MKL -> oneDNN, ~2x faster
    here, gradients still fp32-accurate). With AMX it would compute in bf16, so "auto" leaves it off."""
    if device.type != "cpu":
        return False
    enable = mode == "on" or (mode == "auto" and not cpu_has_amx() and torch.backends.mkldnn.is_available())
    torch.set_float32_matmul_precision("medium" if enable else "highest")
    return enable


def _best_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed call (thread pools, kernels)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-12)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """FLOP/s of a square matmul in `dtype` on `device`, measured now (well under a second), and how.

    The peak that MFU divides by: the rate this machine reaches on the operation training is made of,
    in the dtype the run computes in (fp32, or bf16 under autocast), with the current fp32 matmul setting."""
    return _measured_peak(device, dtype, torch.get_float32_matmul_precision())


@lru_cache(maxsize=8)
def _measured_peak(device: torch.device, dtype: torch.dtype, fp32_precision: str) -> tuple[float, str]:
    n = 4096 if device.type == "cuda" else 512  # a BLAS / tensor-core steady state in milliseconds
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    with torch.no_grad():
        seconds = _best_seconds(lambda: a @ a, device)
    threads = torch.get_num_threads()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {threads} thread{'s' if threads > 1 else ''}")
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))
    return 2 * n**3 / seconds, f"measured {name} {n}x{n} matmul on {where} (best of 3)"


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of this process's peak memory: CUDA's peak allocation on a GPU, else the peak
    resident set of the whole process (the Python runtime and libraries included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak CUDA allocation"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident memory of the process"
