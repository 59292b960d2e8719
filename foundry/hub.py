"""Model directories (the Hugging Face layout of DESIGN.md): find, load and save them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from foundry.config import ModelConfig
from foundry.errors import UserError
from foundry.files import atomic_dir, atomic_path, write_json
from foundry.model import Transformer

LATEST = "latest"  # in a run directory: the name of its newest complete checkpoint


@dataclass
class LoadedModel:
    """A model directory loaded into memory."""

    model: Transformer
    config: ModelConfig
    path: Path
    tokenizer: Any = None  # foundry.tokenizer.Tokenizer when the directory has one
    generation_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # foundry.json


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None if it has none."""
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    ckpt = run_dir / pointer.read_text().strip()
    return ckpt if (ckpt / "config.json").is_file() else None


def resolve_model_dir(spec: str | Path) -> Path:
    """A model directory from a path to one, or to a run directory (its newest checkpoint)."""
    path = Path(spec)
    if (path / "config.json").is_file():
        return path
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is not None:
            return ckpt
        raise UserError(f"{path} is neither a model directory (no config.json) nor a run directory "
                        f"with a complete checkpoint")
    raise UserError(f"model {spec!r} not found: give a model directory, a run directory or a preset name")


def read_config(model_dir: Path) -> ModelConfig:
    """The ModelConfig of a model directory's config.json."""
    try:
        return ModelConfig.from_hf_dict(json.loads((model_dir / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {model_dir / 'config.json'}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def load(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         with_tokenizer: bool = True) -> LoadedModel:
    """Load a model directory (or a run directory's newest checkpoint) for use."""
    model_dir = resolve_model_dir(spec)
    config = read_config(model_dir)
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{model_dir} has no model.safetensors")
    with torch.device("meta"):
        model = Transformer(config)
    state = load_file(str(weights), device=str(device))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{weights}: missing tensors {missing[:5]} / unexpected tensors {unexpected[:5]}")
    model.tie_weights()
    model.init_rotary(device)  # buffers were built on the meta device
    model.eval()
    tokenizer = None
    if with_tokenizer and (model_dir / "tokenizer.json").is_file():
        from foundry.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(model_dir)
    return LoadedModel(model, config, model_dir, tokenizer,
                       _read_json(model_dir / "generation_config.json"), _read_json(model_dir / "foundry.json"))


def write_model_files(model_dir: Path, model: Transformer, tokenizer: Any = None,
                      generation_config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Write config, weights, tokenizer and metadata into an existing (usually temporary) directory."""
    config = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensor = tensor.detach().to(dtype) if dtype is not None else tensor.detach()
        state[name] = tensor.contiguous().cpu().clone()
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    write_json(model_dir / "config.json", hf)
    with atomic_path(model_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    gen.update(generation_config or {})
    write_json(model_dir / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    if tokenizer is not None:
        tokenizer.save(model_dir)
    if meta is not None:
        write_json(model_dir / "foundry.json", meta)


def save(out_dir: str | Path, model: Transformer, tokenizer: Any = None,
         generation_config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
         dtype: torch.dtype | None = None) -> Path:
    """Save a complete model directory atomically (it appears whole or not at all)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} already exists and is not empty; choose another --out")
    if out_dir.exists():
        out_dir.rmdir()
    with atomic_dir(out_dir) as tmp:
        write_model_files(tmp, model, tokenizer, generation_config, meta, dtype)
    return out_dir
