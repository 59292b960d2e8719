"""Run directories as model specs: a run's `latest` pointer names its newest complete checkpoint."""

from __future__ import annotations

from pathlib import Path

LATEST = "latest"  # in a run directory: the name of its newest complete checkpoint


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None if it has none."""
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    ckpt = run_dir / pointer.read_text().strip()
    return ckpt if is_complete(ckpt) else None


def is_complete(checkpoint: Path) -> bool:
    """Whether a checkpoint directory holds a model: its config.json, a LoRA adapter's, or a diffusion model's
    model_index.json (written last)."""
    return any((checkpoint / name).is_file() for name in ("config.json", "adapter_config.json", "model_index.json"))
