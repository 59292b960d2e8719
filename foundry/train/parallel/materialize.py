"""A sharded run's model is built on the meta device, laid out, and only then given storage: no rank ever holds
the whole model, and the weights equal one process's fresh ones (the same draws, each rank keeping its share)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_on_meta(model: nn.Module) -> bool:
    """Whether the model's parameters have no storage yet (built under torch.device("meta"))."""
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int | None) -> None:
    """Give a laid-out meta model (a Transformer, sharded by FSDP or tensor parallel or not) storage on `device`,
    then its fresh weights: each full value is drawn on the CPU in the one-process order (model.initial_values),
    and every rank copies in its own shard, so no collective runs and no rank holds more than one full tensor.
    seed None leaves the storage uninitialised (a checkpoint is about to fill it)."""
    model.to_empty(device=device)
    if seed is not None:
        params = dict(model.named_parameters())
        for name, value in model.initial_values(seed):
            param = params[name]
            if isinstance(param, DTensor):
                shard = distribute_tensor(value.to(device), param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard.to_local())
            else:
                param.copy_(value)
    model.init_rotary(device)


__all__ = ["is_on_meta", "materialize"]
