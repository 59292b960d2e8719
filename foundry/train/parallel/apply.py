"""How a run's parallelism is applied to its model, in torchtitan's order: expert or tensor parallel, activation
checkpointing, compile, then data parallel (FSDP or DDP). The model's code never changes."""

from __future__ import annotations

import torch
from torch import nn

from foundry.core.errors import UserError
from foundry.train.parallel.activation import apply_activation_checkpointing
from foundry.train.parallel.data_parallel import apply_ddp, apply_fsdp
from foundry.train.parallel.world import World

STRATEGIES = ("auto", "none", "ddp", "fsdp")


def data_parallel_strategy(requested: str, world: World) -> str:
    """What --parallel resolves to: with one data-parallel rank there is nothing to shard or synchronise (none);
    with more, auto is FSDP (DDP under expert parallelism, which FSDP does not compose with), and none
    (unsynchronised copies) is refused."""
    if world.dp == 1:
        return "none"
    if world.ep > 1 and requested == "fsdp":
        raise UserError(f"--parallel fsdp does not compose with --ep {world.ep} yet (the experts are split over "
                        f"ranks, not sharded); use --parallel ddp (what auto means with --ep)")
    if requested == "auto":
        return "ddp" if world.ep > 1 else "fsdp"
    if requested == "none":
        raise UserError(f"--parallel none with {world.dp} data-parallel ranks would train {world.dp} unsynchronised "
                        f"copies; use --parallel ddp or fsdp")
    if requested == "ddp" and world.tp > 1:
        raise UserError(f"--parallel ddp does not compose with --tp {world.tp}; use --parallel fsdp (FSDP over the "
                        f"data-parallel ranks, tensor parallel within each group)")
    return requested


def parallelize(model: nn.Module, objective: nn.Module, world: World, strategy: str, *, activation_checkpointing: str,
                compile: bool, bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """Apply the run's parallelism to `model` in place; returns the module to call for a batch's loss.

    Single process: the objective compiled whole (lm_head, upcast and cross-entropy fuse). Distributed: each
    decoder layer compiled on its own, so FSDP's per-layer gathers stay outside the compiled graphs."""
    experts = None
    if world.ep > 1:
        from foundry.train.parallel.expert_parallel import apply_expert_parallel

        experts = apply_expert_parallel(model, world)
    if world.tp > 1:
        from foundry.train.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, world.mesh["tp"])
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile and world.distributed:
        for layer in model.model.layers:
            layer.compile()
    elif compile:
        objective = torch.compile(objective)
    if strategy == "fsdp":
        apply_fsdp(model, world.mesh["dp"], bf16, reshard_after_forward)
    elif strategy == "ddp":
        ddp = apply_ddp(objective, world.device, world.mesh["dp"].get_group(),
                        ignored=experts.params if experts else ())
        if experts is not None:  # the experts' gradients are finished in the passes where DDP reduces the others'
            experts.should_sync = lambda: ddp.require_backward_grad_sync
        objective = ddp
    return objective


__all__ = ["STRATEGIES", "data_parallel_strategy", "parallelize"]
