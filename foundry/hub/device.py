"""Where a loaded model goes: `--device auto|cpu|cuda|cuda:N` resolved, for training and inference alike."""

from __future__ import annotations

import torch

from foundry.core.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N; UserError when it is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0")
    return device
