"""The compiled decode step: one torch.compile graph for every batch size and sequence length.

On CPU the step is compiled with inductor's freezing (the weights become constants, packed once into
the layout its own GEMM kernels want) and max-autotune with its C++ GEMM template. Measured on the
ENVIRONMENT.md model (2 threads, fp32, batch 1, prefill included): 3.44x transformers' tokens/s, against
1.41x for eager oneDNN-prepacked linears (benchmarks/decode_throughput.py), because the frozen C++ GEMVs
stream the weights from memory ~2.5x as fast as oneDNN's. The graph is dynamic in the batch size and in the
longest row's length (the scheduler keeps every per-row quantity in tensors and counts written tokens
outside the call), so a process compiles two graphs: batch 1, and every larger batch.

Freezing reads the weights once: the model must not change after the first step (the engine owns it)."""

from __future__ import annotations

from typing import Any, Callable

import torch

# Inductor settings for the CPU step (applied around each call, so that nothing else in the process
# compiles with them, e.g. a training step).
CPU_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
               "max_autotune_report_choices_stats": False}


def compile_step(step: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """`step` compiled for `device`: on CPU with freezing and the C++ GEMM template, elsewhere as is."""
    # No guards on the model's modules and parameters: the engine owns the model and never changes it
    # (freezing has copied the weights anyway), and checking them costs ~0.3 ms a step.
    compiled = torch.compile(step, dynamic=True,
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as shape_config

    cpu = device.type == "cpu"
    if cpu:
        import torch._inductor.select_algorithm as select_algorithm

        select_algorithm.PRINT_AUTOTUNE = False  # its per-GEMM timing tables would land on the user's stderr

    def run(*args: Any) -> torch.Tensor:
        # No duck sizing: a batch of 2 must not be assumed equal to the 2 KV heads it was first seen beside.
        with inductor_config.patch(CPU_OPTIONS if cpu else {}), \
                shape_config.patch(use_duck_shape=False):
            return compiled(*args)

    return run
