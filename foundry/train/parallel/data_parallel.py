"""Data parallelism: DDP (every rank a full replica) or FSDP2 (parameters, gradients and optimizer state
sharded over the data-parallel ranks, gathered layer by layer as the forward and backward passes need them)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel


def apply_fsdp(model: nn.Module, mesh, bf16: bool, reshard_after_forward: bool = True) -> None:
    """fully_shard each decoder layer, then the root (embeddings, final norm, output head), in place.

    bf16: compute with bf16 parameters gathered from fp32 shards, and reduce gradients in fp32 (the master
    weights and optimizer stay fp32). reshard_after_forward frees each layer's gathered weights after its
    forward pass (gathering again for backward): less memory for more communication. The root is never
    resharded after forward: backward needs its weights first."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def apply_ddp(objective: nn.Module, device: torch.device, process_group=None,
              ignored: Iterable[nn.Parameter] = ()) -> nn.Module:
    """DDP around the training objective (which holds the model), so its forward returns the loss and its
    backward all-reduces (averages) the gradients; the model's own names and parameters are unchanged.

    ignored: parameters DDP neither broadcasts at the start nor reduces (expert parallel's experts, which differ
    from rank to rank and whose gradients are finished elsewhere)."""
    skip = {id(param) for param in ignored}
    if skip:
        names = [name for name, param in objective.named_parameters() if id(param) in skip]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, names)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids, process_group=process_group,
                                   find_unused_parameters=False)


__all__ = ["apply_fsdp", "apply_ddp"]
