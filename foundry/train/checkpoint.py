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

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from foundry import hub
from foundry.hub import LATEST
from foundry.hub.run_dir import is_complete
from foundry.core.errors import UserError
from foundry.core.files import atomic_dir, atomic_file, atomic_path

STATE_FILE = Path("trainer") / "state.pt"
RUN_MARKERS = ("run.yaml", "metrics.jsonl", LATEST)
# Every file or directory a run writes goes through core.files under a temp name `.NAME.<random>.tmp`
# beside its final name (step-N/, loss.png, metrics.jsonl, latest, run.yaml): a killed run leaves these.
TEMP_PATTERN = ".*.tmp"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds (part of) a training run, if only what a run killed in its first writes left."""
    return (any((path / name).exists() for name in RUN_MARKERS) or any(path.glob("step-*"))
            or any(path.glob(".step-*.tmp")) or any(any(path.glob(f".{name}.*.tmp")) for name in RUN_MARKERS))


def clean_partial_writes(run_dir: Path) -> list[Path]:
    """Remove what a killed process left under temp names in `run_dir`; returns what it removed.

    Call it only when no other process is writing to `run_dir` (a run starting or resuming)."""
    removed = sorted(run_dir.glob(TEMP_PATTERN))
    for tmp in removed:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return removed


def latest_name(run_dir: Path) -> str | None:
    """The checkpoint name `latest` holds (None without one)."""
    pointer = run_dir / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    trainer_state: dict[str, Any], meta: dict[str, Any], keep: int,
                    write_model: Callable[[Path, torch.nn.Module, dict[str, Any]], None] | None = None) -> Path:
    """Write step-N/ whole under a temp name, rename it, then point `latest` at it.

    write_model(dir, model, meta) writes a recipe's own model files (an adapter, a classifier) instead of
    a causal LM's."""
    name = checkpoint_name(step)
    final = run_dir / name
    if final.exists():
        if latest_name(run_dir) == name:  # already complete and current: nothing to do
            return final
        remove_stale(run_dir, name)
    with atomic_dir(final) as tmp:
        if write_model is not None:
            write_model(tmp, model, meta)
        else:
            hub.write_model_files(tmp, model, tokenizer, meta=meta)
        write_trainer_state(tmp, trainer_state)
    publish_latest(run_dir, final, keep)
    return final


def remove_stale(run_dir: Path, name: str) -> None:
    """Remove a step-N/ that `latest` does not name, before this run writes its own step N.

    Left by a process killed before it pointed `latest` there (or by a run since rolled back), it may hold other
    settings' weights, so this run's state replaces it. `latest` names an older checkpoint throughout, so a crash
    at any point still leaves a loadable run."""
    aside = run_dir / f".{name}.replaced.tmp"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(run_dir / name, aside)
    shutil.rmtree(aside)


def write_trainer_state(checkpoint_dir: Path, trainer_state: dict[str, Any]) -> None:
    """trainer/state.pt inside a checkpoint being written."""
    (checkpoint_dir / "trainer").mkdir()
    with atomic_path(checkpoint_dir / STATE_FILE) as state_path:
        torch.save(trainer_state, state_path)


def publish_latest(run_dir: Path, checkpoint: Path, keep: int) -> None:
    """Point `latest` at a complete checkpoint, then delete the complete ones past the newest `keep`."""
    with atomic_file(run_dir / LATEST, "w") as handle:
        handle.write(checkpoint.name + "\n")
    _prune(run_dir, keep, newest=checkpoint)


def _prune(run_dir: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    complete = sorted(p for p in run_dir.glob("step-*") if is_complete(p))
    for old in complete[:-keep]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state saved beside a checkpoint's model files."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise UserError(f"{checkpoint} has no {STATE_FILE}: it is a model directory, not a resumable checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def _cuda_in_use() -> bool:
    # Only once CUDA is initialised: asking for its RNG state earlier would initialise it (and a GPU).
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rng_states() -> dict[str, Any]:
    """The random-number states a resumed run continues from: the CPU's, and every CUDA device's in use."""
    return {"rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if _cuda_in_use() else None}


def restore_rng_states(state: dict[str, Any]) -> None:
    """Put back what `rng_states` saved (CUDA's on as many of the saved devices as this machine has)."""
    torch.set_rng_state(state["rng_cpu"])
    for index, cuda_state in enumerate((state.get("rng_cuda") or [])[:_cuda_device_count()]):
        torch.cuda.set_rng_state(cuda_state, index)
