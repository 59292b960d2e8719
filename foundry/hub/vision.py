"""ViT directories: a ViT image classifier saved and loaded in the layout of transformers'
ViTForImageClassification (config.json with id2label, model.safetensors under the names transformers writes,
preprocessor_config.json of ViTImageProcessor, foundry.json), so transformers loads it as it is and foundry
loads what transformers saves."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from foundry.config.vision_config import ImageProcessing, ViTConfig
from foundry.core.errors import UserError
from foundry.core.files import atomic_dir, write_json
from foundry.hub.directory import _checkpoint_dtype, _new_dir, resolve_model_dir
from foundry.hub.run_dir import latest_checkpoint
from foundry.hub.stored import read_json_object
from foundry.hub.weights import (DEFAULT_SHARD_SIZE, checked_state, parse_size, read_tensors, weight_files,
                                 write_tensors)
from foundry.model.vit import ViT

PREPROCESSOR_CONFIG = "preprocessor_config.json"
# transformers 5 renames ViT's modules in memory (vit.layers.N.attention.q_proj, ...) and writes the classic names
# back on saving; a file under the in-memory names is read too, mapped to the classic ones foundry's modules carry.
_V5_NAMES = [(re.compile(pattern), repl) for pattern, repl in (
    (r"^vit\.layers\.(\d+)\.attention\.([qkv])_proj\.",
     lambda m: f"vit.encoder.layer.{m[1]}.attention.attention.{dict(q='query', k='key', v='value')[m[2]]}."),
    (r"^vit\.layers\.(\d+)\.attention\.o_proj\.", r"vit.encoder.layer.\1.attention.output.dense."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
    (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
)]
# Tensors a ViTModel checkpoint may carry that the classifier does not use (transformers drops them too).
_UNUSED = ("vit.pooler.",)


@dataclass
class LoadedViT:
    """A ViT directory loaded into memory: the model (eval mode), how its images are prepared, where it was."""

    model: ViT
    processing: ImageProcessing
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)  # foundry.json

    @property
    def labels(self) -> list[str]:
        return self.model.config.labels


def _check_processing(config: ViTConfig, processing: ImageProcessing) -> None:
    if processing.num_channels != config.num_channels:
        raise UserError(f"the image processing has {processing.num_channels} channel(s) but the ViT reads "
                        f"{config.num_channels}; make them agree")
    if processing.size != config.image_size:
        raise UserError(f"the image processing resizes to {processing.size}x{processing.size} but the ViT reads "
                        f"{config.image_size}x{config.image_size} images; make them agree")


def write_vit_files(model_dir: Path, model: ViT, processing: ImageProcessing, meta: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json, model.safetensors, preprocessor_config.json and (when meta is given) foundry.json into
    an existing, usually temporary, directory. dtype None keeps the weights' own."""
    config = model.config
    _check_processing(config, processing)
    written = write_tensors(model_dir, model.state_dict().items(), parse_size(DEFAULT_SHARD_SIZE), dtype)
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(written).removeprefix("torch.")
    write_json(model_dir / "config.json", hf)
    write_json(model_dir / PREPROCESSOR_CONFIG, processing.to_hf_dict())
    if meta is not None:
        write_json(model_dir / "foundry.json", meta)


def save_vit(out_dir: str | Path, model: ViT, processing: ImageProcessing, meta: dict[str, Any] | None = None,
             dtype: torch.dtype | None = None) -> Path:
    """Save a ViT directory atomically (it appears whole or not at all); out_dir must not exist or be empty."""
    out_dir = Path(out_dir)
    _check_processing(model.config, processing)  # refused before anything is written
    _new_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_vit_files(tmp, model, processing, meta, dtype)
    return out_dir


def is_vit_dir(path: str | Path) -> bool:
    """Whether a model directory (or a run directory's newest checkpoint) holds a ViT: config.json's model_type."""
    path = Path(path)
    if not (path / "config.json").is_file() and path.is_dir():
        path = latest_checkpoint(path) or path
    if not (path / "config.json").is_file():
        return False
    try:
        raw = read_json_object(path / "config.json")
    except UserError:
        return False
    return isinstance(raw, dict) and raw.get("model_type") == "vit"


def read_vit_config(model_dir: Path) -> ViTConfig:
    """The ViTConfig of a directory's config.json."""
    where = model_dir / "config.json"
    return ViTConfig.from_hf_dict(read_json_object(where), str(where))


def read_processing(model_dir: Path, config: ViTConfig) -> ImageProcessing:
    """A directory's preprocessor_config.json; without one, ViTImageProcessor's defaults at the model's size
    (resize to image_size, rescale by 1/255, mean and std 0.5)."""
    path = model_dir / PREPROCESSOR_CONFIG
    if not path.is_file():
        return ImageProcessing(size=config.image_size, num_channels=config.num_channels)
    return ImageProcessing.from_hf_dict(read_json_object(path), str(path), num_channels=config.num_channels)


def file_name(name: str) -> str:
    """A tensor's name in a ViT file under foundry's (classic transformers) name; transformers 5's in-memory
    spelling is translated."""
    for pattern, repl in _V5_NAMES:
        name, count = pattern.subn(repl, name)
        if count:
            break
    return name


def _read_state(model_dir: Path, expected: dict[str, torch.Size], device: str | torch.device,
                dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A directory's tensors, checked against `expected` (name -> shape): every name there, nothing else."""
    kind, files = weight_files(model_dir)

    def rename(stored: str) -> str | None:
        name = file_name(stored)
        return None if name.startswith(_UNUSED) else name

    return checked_state(read_tensors(kind, files), expected, str(model_dir),
                         "config.json (ViTForImageClassification)", device, dtype, rename)


def load_vit(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedViT:
    """Load a ViT directory (foundry's or transformers' save_pretrained), a run directory's newest checkpoint, or a
    Hub id, in eval mode. dtype None keeps the checkpoint's (config.json's, else the files').

    A directory without preprocessor_config.json gets ViTImageProcessor's defaults at the model's image_size
    (mean and std 0.5): right for models trained that way, not for ImageNet-normalised ones."""
    model_dir = resolve_model_dir(spec)
    if not is_vit_dir(model_dir):
        raise UserError(f"{model_dir} is not a ViT directory (config.json's model_type is not 'vit')")
    config = read_vit_config(model_dir)
    processing = read_processing(model_dir, config)
    with torch.device("meta"):
        model = ViT(config)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    state = _read_state(model_dir, expected, device, dtype or _checkpoint_dtype(model_dir))
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    meta_path = model_dir / "foundry.json"
    meta = read_json_object(meta_path) if meta_path.is_file() else {}
    return LoadedViT(model, processing, model_dir, meta if isinstance(meta, dict) else {})


__all__ = ["LoadedViT", "is_vit_dir", "load_vit", "save_vit", "write_vit_files", "read_vit_config",
           "read_processing", "PREPROCESSOR_CONFIG"]
