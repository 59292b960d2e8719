"""Resolving a model spec (preset, config file, model or run directory, Hub id) to a config, torch-free."""

from __future__ import annotations

from pathlib import Path

from foundry.config import PRESETS, ModelConfig, preset, read_config_file
from foundry.core.errors import UserError
from foundry.hub.download import fetch, is_hub_id
from foundry.hub.run_dir import latest_checkpoint


def resolve_model_source(spec: str | Path) -> tuple[ModelConfig, Path | None]:
    """(config, model directory or None) for a preset, a config file, a model directory, a run directory or a
    Hub id."""
    if isinstance(spec, str) and spec in PRESETS:
        return preset(spec), None
    path = Path(spec)
    if path.is_file():
        return read_config_file(path), None
    if path.is_dir() and not (path / "config.json").is_file():
        path = latest_checkpoint(path) or path  # a run directory: its newest checkpoint
    if (path / "config.json").is_file():
        return read_config_file(path / "config.json"), path
    hub = ""
    if not path.exists() and is_hub_id(spec):  # only config.json is fetched; hub.load completes the snapshot
        try:
            path = fetch(str(spec), ["config.json"])
            return read_config_file(path / "config.json"), path
        except UserError as exc:
            hub = f" ({exc})"
    raise UserError(f"model {str(spec)!r} is not a preset ({', '.join(PRESETS)}), a config file, "
                    f"a model directory, a run directory or a Hugging Face Hub id{hub}")
