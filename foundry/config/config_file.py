"""Reading a model config from a file: a YAML of ModelConfig fields (optionally on top of a preset) or a
Hugging Face config.json."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from foundry.config.model_config import ModelConfig, checked_fields
from foundry.config.presets import preset
from foundry.core.errors import UserError


def read_config_file(path: str | Path) -> ModelConfig:
    """Load a YAML file of ModelConfig fields (`preset: NAME` starts from a preset), or a config.json."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read model config {path}: {exc.strerror}") from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{path} is not valid JSON ({exc})") from None
        return ModelConfig.from_hf_dict(raw)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of ModelConfig fields")
    if "preset" in data:
        return preset(data.pop("preset")).replace(**data)
    return ModelConfig(**checked_fields(ModelConfig, data, str(path)))
