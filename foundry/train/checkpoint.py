"""Checkpoints: each one a complete model directory plus `trainer/`, written atomically.

RUN_DIR/
  run.yaml            the resolved TrainConfig
  metrics.jsonl       one line per logged step / evaluation
  loss.png            the loss curve
  step-000100/        a model directory (config.json, model.safetensors, tokenizer, foundry.json)
    trainer/state.pt  optimizer, data position, RNG states, progress
  latest              the name of the newest complete checkpoint
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from foundry import hub
from foundry.hub import LATEST
from foundry.core.errors import UserError
from foundry.core.files import atomic_dir, atomic_file, atomic_path

STATE_FILE = Path("trainer") / "state.pt"
RUN_MARKERS = ("run.yaml", "metrics.jsonl", LATEST)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds (part of) a training run."""
    return any((path / name).exists() for name in RUN_MARKERS) or any(path.glob("step-*"))


def clean_partial_writes(run_dir: Path) -> None:
    """Remove temp directories left by a process killed while writing a checkpoint."""
    for tmp in run_dir.glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    trainer_state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write step-N/ whole under a temp name, rename it, then point `latest` at it."""
    name = checkpoint_name(step)
    final = run_dir / name
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        return final
    with atomic_dir(final) as tmp:
        hub.write_model_files(tmp, model, tokenizer, meta=meta)
        (tmp / "trainer").mkdir()
        with atomic_path(tmp / STATE_FILE) as state_path:
            torch.save(trainer_state, state_path)
    with atomic_file(run_dir / LATEST, "w") as handle:
        handle.write(name + "\n")
    _prune(run_dir, keep, newest=final)
    return final


def _prune(run_dir: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    complete = sorted(p for p in run_dir.glob("step-*") if (p / "config.json").is_file())
    for old in complete[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved beside a checkpoint's model files."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise UserError(f"{checkpoint} has no {STATE_FILE}: it is a model directory, not a resumable checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)
