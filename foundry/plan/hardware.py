"""The accelerator catalog the planner prices and sizes against, plus `cpu`, measured on the spot.

Peak figures are dense (no 2:4 sparsity) bf16 tensor throughput from the vendors' datasheets.
Memory is the marketed capacity read as 10**9 bytes: about 7% less than the HBM's binary size,
a margin that stands in for the CUDA context, workspaces and allocator fragmentation.
Prices are indicative on-demand cloud rates (late 2025); they vary twofold between providers,
so override them with --price (the H800's is the rate the DeepSeek-V3 report assumes). Imports nothing
beyond the standard library (numpy lazily).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass

from foundry.core.errors import UserError

# Default model-FLOPs utilisation (PaLM's MFU: 6N + attention FLOPs per token over peak), from runs.
LLAMA3_MFU = "Llama 3 405B on 8-16K H100s: 38-43% bf16 MFU (Llama Team 2024, arXiv:2407.21783, Table 4)"
MEGATRON_MFU = ("GPT-3 175B on A100s: 51.4% MFU with selective recompute "
                "(Korthikanti et al. 2022, arXiv:2205.05198; table in Megatron-LM's README)")
ASSUMED = "no large published run; assumed"
# DeepSeek-AI 2024 (DeepSeek-V3 Technical Report, arXiv:2412.19437), Sec. 1: pre-training "each trillion tokens
# needs 180K H800 GPU hours", at its 4K context; 1e12 / (180e3 * 3600) = 1,543 tokens/s per GPU. The planner counts
# 2.867e11 FLOPs per token for DeepSeek-V3 at 4K (6 x 37.55B active parameters + PaLM's attention term
# 6*L*H*(Q_k + Q_v)*T = 6.14e10), so the run achieved 1,543 x 2.867e11 = 442 TFLOP/s per GPU: 44.7% of the bf16 dense
# peak, 22% of the FP8 one. The run is FP8 mixed precision (FP8 GEMMs; attention, norms, the router, embeddings
# and the optimizer in BF16/FP32), so the bf16 peak is the one quoted, as for every other entry; 6N alone would be
# 35%. tests/test_plan_moe.py re-derives this figure from the report's numbers.
DEEPSEEK_V3_MFU = ("DeepSeek-V3 on 2048 H800s (arXiv:2412.19437): 180K GPU-hours per 1T tokens = 1,543 tokens/s/GPU; "
                   "x 2.87e11 FLOPs/token (6 x 37.6B active + attention at 4K) = 442 TFLOP/s = 44.7% of the bf16 "
                   "dense peak (FP8 training; 22% of the FP8 peak)")


@dataclass(frozen=True)
class Hardware:
    """One accelerator: what the planner needs to know about it."""

    name: str
    label: str
    peak_flops: float  # dense bf16 FLOP/s (cpu: measured fp32 matmul)
    memory_bytes: float
    bandwidth: float  # memory bytes/s
    price_per_hour: float  # $ per device-hour
    mfu: float
    mfu_source: str
    spec_source: str
    measured: bool = False


CATALOG: dict[str, Hardware] = {h.name: h for h in (
    Hardware("a100-40gb", "NVIDIA A100 SXM 40GB", 312e12, 40e9, 1.555e12, 1.29, 0.50, MEGATRON_MFU,
             "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 1,555 GB/s HBM2"),
    Hardware("a100-80gb", "NVIDIA A100 SXM 80GB", 312e12, 80e9, 2.039e12, 1.79, 0.50, MEGATRON_MFU,
             "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 2,039 GB/s HBM2e"),
    Hardware("h100-sxm", "NVIDIA H100 SXM 80GB", 989.4e12, 80e9, 3.35e12, 2.99, 0.40, LLAMA3_MFU,
             "NVIDIA H100 datasheet: 1,979 TFLOPS bf16 with sparsity, half dense; 3.35 TB/s HBM3"),
    Hardware("h100-pcie", "NVIDIA H100 PCIe 80GB", 756e12, 80e9, 2.0e12, 2.49, 0.40,
             f"{LLAMA3_MFU}, carried over from SXM",
             "NVIDIA H100 datasheet: 1,513 TFLOPS bf16 with sparsity, half dense; 2.0 TB/s HBM2e"),
    Hardware("h800", "NVIDIA H800 SXM 80GB", 989.4e12, 80e9, 3.35e12, 2.00, 0.45, DEEPSEEK_V3_MFU,
             "NVIDIA H800 SXM: H100 SXM compute (989 TFLOPS bf16 dense, 1,979 FP8 dense), NVLink cut to 400 GB/s, "
             "80 GB HBM3 at 3.35 TB/s; $2/GPU-hour as DeepSeek-V3's report assumes"),
    Hardware("h200", "NVIDIA H200 SXM 141GB", 989.4e12, 141e9, 4.8e12, 3.79, 0.40,
             f"{LLAMA3_MFU}, same compute as H100",
             "NVIDIA H200 datasheet: H100 compute, 141 GB HBM3e at 4.8 TB/s"),
    Hardware("b200", "NVIDIA B200 (HGX) 180GB", 2.25e15, 180e9, 8.0e12, 5.99, 0.40,
             f"{ASSUMED} equal to H100's",
             "NVIDIA HGX B200 datasheet: 36 PFLOPS bf16 sparse per 8 GPUs, 1.44 TB at 64 TB/s per 8"),
    Hardware("mi300x", "AMD Instinct MI300X 192GB", 1307.4e12, 192e9, 5.3e12, 2.49, 0.35,
             f"{ASSUMED} below H100's for a less mature software stack",
             "AMD MI300X datasheet: 1,307.4 TFLOPS bf16 dense, 192 GB HBM3 at 5.3 TB/s"),
    Hardware("l4", "NVIDIA L4 24GB", 121e12, 24e9, 300e9, 0.80, 0.35, ASSUMED,
             "NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity, half dense; 24 GB GDDR6 at 300 GB/s"),
)}

ALIASES = {"a100": "a100-80gb", "a100-40": "a100-40gb", "a100-80": "a100-80gb", "h100": "h100-sxm",
           "h100sxm": "h100-sxm", "h100pcie": "h100-pcie", "h800-sxm": "h800", "h800sxm": "h800", "mi300": "mi300x"}
CPU_PRICE_PER_CORE_HOUR = 0.04  # indicative on-demand general-purpose vCPU rate
NAMES = (*CATALOG, "cpu")


def lookup(name: str) -> Hardware:
    """The catalog entry for `name` (case-insensitive), or `cpu` measured now."""
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key == "cpu":
        return measure_cpu()
    if key not in CATALOG:
        raise UserError(f"unknown hardware {name!r}; known: {', '.join(NAMES)}")
    return CATALOG[key]


def with_overrides(hw: Hardware, price: float | None = None, mfu: float | None = None) -> Hardware:
    """A copy of `hw` with the user's $/hour and MFU in place of the defaults."""
    changes = {}
    if price is not None:
        changes["price_per_hour"] = price
    if mfu is not None:
        changes.update(mfu=mfu, mfu_source="given by --mfu")
    return dataclasses.replace(hw, **changes)


@functools.lru_cache(maxsize=1)
def measure_cpu() -> Hardware:
    """This machine as a device: fp32 matmul peak and copy bandwidth measured with numpy, RAM from the OS."""
    cores = os.cpu_count() or 1
    memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        import numpy as np
    except ImportError:
        # Without numpy, nominal figures keep the plan usable; the label says they are not measured.
        return Hardware("cpu", f"this CPU ({cores} cores, numpy missing: nominal figures)", 50e9 * cores,
                        memory, 20e9, CPU_PRICE_PER_CORE_HOUR * cores, 0.5, ASSUMED,
                        "nominal 50 GFLOP/s per core and 20 GB/s", measured=False)
    n = 768  # big enough for a BLAS kernel's steady state, small enough to take milliseconds
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    flops = 2 * n**3 / _best_seconds(lambda: a @ a)
    src = np.ones(16 * 2**20, dtype=np.float32)  # 64 MiB: far beyond the caches
    dst = np.empty_like(src)
    bandwidth = 2 * src.nbytes / _best_seconds(lambda: np.copyto(dst, src))  # read + write
    return Hardware("cpu", f"this CPU ({cores} cores, measured now)", flops, memory, bandwidth,
                    CPU_PRICE_PER_CORE_HOUR * cores, 0.5,
                    f"{ASSUMED}: half of the measured fp32 matmul peak",
                    "numpy fp32 768x768 matmul and 64 MiB copy, best of 3", measured=True)


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: thread pools, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


__all__ = ["CATALOG", "NAMES", "Hardware", "lookup", "measure_cpu", "with_overrides"]
