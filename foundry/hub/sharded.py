"""Checkpoints of distributed runs: every rank's share of the weights (and optimizer state) in PyTorch's
distributed-checkpoint format (torch.distributed.checkpoint), under CHECKPOINT/dcp/, beside the config.json,
tokenizer and foundry.json of an ordinary model directory.

Reading one here consolidates it in this one process: DCP reassembles each full tensor from the ranks' pieces,
whatever the layout (FSDP, tensor parallel, DDP) and world size that wrote it. `foundry export` therefore turns a
sharded checkpoint into a Hugging Face directory, and `generate`, `eval` or a one-process `--resume` read it as
they read any model directory.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

DCP_DIR = "dcp"  # in a checkpoint: the torch.distributed.checkpoint files (.metadata, __R_0.distcp per rank)
MODEL_KEY = "model"  # the top-level keys of the saved state: the model's state dict, the optimizer's
OPTIMIZER_KEY = "optim"


def is_sharded(model_dir: Path) -> bool:
    """Whether a checkpoint holds its weights as a distributed checkpoint (written by several ranks)."""
    return (Path(model_dir) / DCP_DIR / ".metadata").is_file()


def read_sharded_state(model_dir: Path, expected: dict[str, torch.Size], device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model weights (foundry's names -> tensors of the `expected` shapes) of a sharded checkpoint,
    read in this one process."""
    import torch.distributed.checkpoint as dcp

    state = {name: torch.empty(shape, dtype=torch.float32) for name, shape in expected.items()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({MODEL_KEY: state}, checkpoint_id=Path(model_dir) / DCP_DIR, no_dist=True)
    return {name: tensor.to(device=device, dtype=dtype or tensor.dtype) for name, tensor in state.items()}


__all__ = ["DCP_DIR", "MODEL_KEY", "OPTIMIZER_KEY", "is_sharded", "read_sharded_state"]
