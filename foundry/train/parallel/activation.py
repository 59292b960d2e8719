"""Activation checkpointing, applied to each decoder layer from outside: full or selective recomputation.

full: a layer keeps only its input and recomputes everything else in the backward pass (the least memory).
selective: a layer keeps the outputs of its matrix multiplications and of attention (the costly ops) and
recomputes the cheap element-wise ones (norms, activations, rotary, residual adds): most of the memory saved
for a small part of the compute (Korthikanti et al. 2022 recompute the attention core instead; with a fused
attention kernel that keeps no score matrix, the element-wise ops are what is left to drop).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

MODES = ("off", "full", "selective")

_aten = torch.ops.aten
# The ops whose outputs selective checkpointing keeps: the matmuls, attention, and a reduce-scatter (tensor
# parallel's), which recomputing would send over the network again.
_KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.linear.default,
         _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
         _aten._scaled_dot_product_flash_attention_for_cpu.default,
         _aten._scaled_dot_product_cudnn_attention.default, torch.ops._c10d_functional.reduce_scatter_tensor.default}


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward: Callable[..., torch.Tensor], mode: str) -> Callable[..., torch.Tensor]:
    context = functools.partial(create_selective_checkpoint_contexts, _policy) if mode == "selective" else None

    @functools.wraps(forward)
    def run(*args: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return forward(*args)
        if context is None:
            return checkpoint(forward, *args, use_reentrant=False)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context)

    return run


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Make each decoder layer of `model` (a Transformer) recompute its activations as `mode` says.

    The layers keep their names and parameters (nothing is wrapped), so state dicts, FSDP and compile see the
    same model; the layer's forward is what changes."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {MODES}")
    if mode == "off":
        return
    for layer in model.model.layers:
        layer.forward = _checkpointed(layer.forward, mode)


__all__ = ["MODES", "apply_activation_checkpointing"]
