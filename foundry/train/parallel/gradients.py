"""Gradient-norm clipping over parameters that may be sharded (FSDP), split (tensor parallel) or plain."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most max_norm; returns the norm before clipping.

    DTensor gradients count once over all ranks (a sharded gradient's pieces, a replicated one once), grouped
    by device mesh, because torch's own clip_grad_norm_ cannot combine gradients living on different meshes
    (FSDP's 1-D layers beside tensor parallel's 2-D ones). NaN or inf propagates into the result."""
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


__all__ = ["clip_grad_norm"]
