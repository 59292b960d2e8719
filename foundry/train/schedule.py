"""Learning-rate schedule: linear warmup, then cosine decay to a floor reached on the last step."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total`-step run.

    Steps 0..warmup-1 rise linearly to `base_lr`; steps warmup..total-1 follow a cosine from `base_lr`
    down to `base_lr * min_ratio`, which the last step (total - 1) and any later one get exactly."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if step >= total - 1:
        return base_lr * min_ratio
    progress = (step - warmup) / (total - 1 - warmup)  # in [0, 1): step < total - 1 here
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr * (min_ratio + (1 - min_ratio) * cosine)
