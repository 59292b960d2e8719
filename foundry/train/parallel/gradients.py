"""Gradient-norm clipping over parameters that may be sharded (FSDP), split (tensor parallel), spread over ranks
(expert parallel's experts) or plain."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from foundry.train.parallel.expert_parallel import EXPERT_GROUP, is_expert_param


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most max_norm; returns the norm before clipping.

    DTensor gradients count once over all ranks (a sharded gradient's pieces, a replicated one once), grouped
    by device mesh, because torch's own clip_grad_norm_ cannot combine gradients living on different meshes
    (FSDP's 1-D layers beside tensor parallel's 2-D ones). Expert parallel: each expert counts once, from the
    rank of each ep group that holds it. NaN or inf propagates into the result."""
    parameters = list(parameters)
    experts = [p for p in parameters if is_expert_param(p)]
    if experts:
        return _clip_expert_parallel(parameters, experts, max_norm)
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    if not grads:
        return 0.0
    if not any(isinstance(grad, DTensor) for grad in grads):  # one process or DDP: torch's own, bit for bit
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm).item())
    by_mesh: dict[object, list[torch.Tensor]] = defaultdict(list)
    for grad in grads:
        by_mesh[grad.device_mesh if isinstance(grad, DTensor) else None].append(grad)
    squared = 0.0
    for mesh, group in by_mesh.items():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared += float(norm.item()) ** 2
    total = math.sqrt(squared)
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:  # a non-finite total leaves the gradients alone: the loop drops the step
        for group in by_mesh.values():
            torch._foreach_mul_(group, coefficient)
    return total


def _clip_expert_parallel(parameters: list[torch.Tensor], experts: list[torch.Tensor], max_norm: float) -> float:
    # The replicated parameters' squared norm here, plus the experts' summed over the ep group (every rank calls
    # this, with or without expert gradients, so the all-reduce always meets its peers).
    held = {id(p) for p in experts}
    shared = [p.grad for p in parameters if p.grad is not None and id(p) not in held]
    own = [p.grad for p in experts if p.grad is not None]
    shared_squared, own_squared = (_squared_norm(grads, experts[0].device) for grads in (shared, own))
    dist.all_reduce(own_squared, group=getattr(experts[0], EXPERT_GROUP))
    total = math.sqrt(float((shared_squared + own_squared).item()))
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:  # a non-finite total leaves the gradients alone: the loop drops the step
        torch._foreach_mul_(shared + own, coefficient)
    return total


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0).to(device, torch.float64) ** 2


__all__ = ["clip_grad_norm"]
