"""A sharded run's model is built on the meta device, laid out, and only then given storage: no rank ever holds
the whole model, and the weights equal one process's fresh ones (the same draws, each rank keeping its share)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_on_meta(model: nn.Module) -> bool:
    """Whether the model's parameters have no storage yet (built under torch.device("meta"))."""
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, values: Iterable[tuple[str, torch.Tensor]] | None) -> None:
    """Give a laid-out meta model (a Transformer, sharded by FSDP or tensor parallel or not) storage on `device`,
    then its weights from `values`: (name, full tensor) one at a time, on the CPU, such as the fresh draws of
    model.initial_values(seed) or a model directory's tensors (hub.directory.iter_state). Every rank copies in
    its own shard of each, so no collective runs and no rank holds more than one full tensor. values None
    leaves the storage uninitialised (a sharded checkpoint is about to fill it)."""
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    for name, value in values or ():
        param = params[name]
        value = value.to(device=device, dtype=param.dtype)
        if isinstance(param, DTensor):
            shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(value)
    model.init_rotary(device)


__all__ = ["is_on_meta", "materialize"]
