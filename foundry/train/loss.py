"""The training objective as a module, so that `torch.compile` fuses lm_head, upcast and cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy of `model` on (inputs, targets); targets of -100 are ignored."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
