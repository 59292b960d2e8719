"""The training objective as a module, so that `torch.compile` fuses lm_head, upcast and cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foundry.core.errors import UserError


class NonFiniteLoss(UserError):
    """The loss or the gradient norm became NaN or infinite: the run stopped without saving.

    A UserError because the remedy is a setting (learning rate, warm-up, clipping): the CLI prints the
    one-line message (step, last finite loss, advice) and exits 2; the last good checkpoint stays `latest`."""


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy of `model` on (inputs, targets); targets of -100 are ignored."""

    def __init__(self, model: nn.Module, chunk_rows: int = 128):
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """positions/segments: packed fine-tuning rows (positions restart per example, attention stays inside it)."""
        if positions is None:
            logits = self.model(inputs)
        else:
            logits = self.model(inputs, positions, segments=segments)
        logits = logits.float().flatten(0, 1)
        targets = targets.flatten()
        # Row chunks keep each log-softmax in cache: ~2x faster than one pass over [B*T, vocab] on CPU.
        total = sum(F.cross_entropy(rows, target, ignore_index=-100, reduction="sum")
                    for rows, target in zip(logits.split(self.chunk_rows), targets.split(self.chunk_rows)))
        return total / (targets != -100).sum().clamp(min=1)

    def loss_weight(self, inputs: torch.Tensor, targets: torch.Tensor, *rest: torch.Tensor) -> float:
        """What forward's mean divides by: the batch's scored targets. The loop weighs micro-batches and ranks by
        it, so that a step's loss is the mean over all its tokens (also when masks leave them unequal)."""
        return float((targets != -100).sum().clamp(min=1))
