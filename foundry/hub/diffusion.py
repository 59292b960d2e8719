"""DiT directories: a class-conditional DiT and its noise schedule in the layout of a diffusers pipeline.

    my-dit/
      model_index.json                               # names the two components, each by diffusers class
      transformer/config.json                        # DiTTransformer2DModel's config (+ foundry's "_foundry")
      transformer/diffusion_pytorch_model.safetensors
      scheduler/scheduler_config.json                # DDIMScheduler's config
      foundry.json                                   # what foundry adds (training recipe, ...)

Each component loads in diffusers as it is (`DiTTransformer2DModel.from_pretrained(dir, subfolder="transformer")`,
`DDIMScheduler.from_pretrained(dir, subfolder="scheduler")`). The directory is not a runnable diffusers pipeline:
DiTPipeline decodes latents with a VAE and hard-codes ImageNet's null class 1000, and a pixel-space DiT has
neither, so model_index.json's "_class_name" says what the directory is, "FoundryDiTPipeline", and
DiffusionPipeline.from_pretrained refuses it rather than building something that cannot run. The weights are
written under the model's own state_dict names, which are diffusers' (foundry.model.dit names its modules so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from foundry.config.vision_config import DIT_CLASS, DiTConfig
from foundry.core.errors import UserError
from foundry.core.files import atomic_dir, write_json
from foundry.hub.directory import _new_dir
from foundry.hub.run_dir import LATEST
from foundry.hub.stored import read_json_object
from foundry.hub.weights import checked_state, read_tensors
from foundry.model.dit import DiT
from foundry.model.noise_schedule import SCHEDULER_CLASS, NoiseSchedule

PIPELINE_CLASS = "FoundryDiTPipeline"
MODEL_INDEX = "model_index.json"
TRANSFORMER_CONFIG = "transformer/config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TRANSFORMER_WEIGHTS = "transformer/" + WEIGHTS_NAME
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclass
class LoadedDiT:
    """A DiT directory loaded into memory."""

    model: DiT
    schedule: NoiseSchedule
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)  # foundry.json

    @property
    def labels(self) -> list[str]:
        """The class names a foundry run wrote to foundry.json (diffusers' files have none); else "0", "1", ..."""
        labels = self.meta.get("labels")
        return list(labels) if labels else [str(i) for i in range(self.model.config.num_classes)]


def model_index() -> dict[str, Any]:
    """model_index.json contents: the pipeline's components by (library, class), as diffusers spells them."""
    return {"_class_name": PIPELINE_CLASS, "transformer": ["diffusers", DIT_CLASS],
            "scheduler": ["diffusers", SCHEDULER_CLASS]}


def write_dit_files(model_dir: Path, model: DiT, schedule: NoiseSchedule, meta: dict[str, Any] | None = None) -> None:
    """Write a DiT directory's files into an existing (usually temporary) directory."""
    model_dir = Path(model_dir)
    (model_dir / "transformer").mkdir(parents=True, exist_ok=True)
    (model_dir / "scheduler").mkdir(parents=True, exist_ok=True)
    # The parameters only: the position table is a non-persistent buffer, as diffusers keeps it.
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(model_dir / TRANSFORMER_WEIGHTS), metadata={"format": "pt"})
    write_json(model_dir / TRANSFORMER_CONFIG, model.config.to_diffusers_dict())
    write_json(model_dir / SCHEDULER_CONFIG, schedule.to_scheduler_config())
    if meta is not None:
        write_json(model_dir / "foundry.json", meta)
    write_json(model_dir / MODEL_INDEX, model_index())


def save_dit(out_dir: str | Path, model: DiT, schedule: NoiseSchedule, meta: dict[str, Any] | None = None) -> Path:
    """Save a DiT directory atomically (it appears whole or not at all); out_dir must not exist or be empty."""
    out_dir = Path(out_dir)
    _new_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_dit_files(tmp, model, schedule, meta)
    return out_dir


def is_dit_dir(path: str | Path) -> bool:
    """Whether a path is a DiT directory, a bare diffusers DiTTransformer2DModel folder, or a run directory whose
    newest checkpoint is one of those."""
    try:
        return _find(Path(path)) is not None
    except UserError:
        return False


def _is_dit_config(path: Path) -> bool:
    return path.is_file() and read_json_object(path).get("_class_name") == DIT_CLASS


def _find(path: Path) -> tuple[Path, Path] | None:
    """(the directory, its transformer folder) a path names, else None: a pipeline directory, a bare transformer
    folder (config.json + weights, as DiTTransformer2DModel.save_pretrained writes it) or a run directory."""
    if not (path / MODEL_INDEX).is_file() and not (path / "config.json").is_file() and (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if _is_dit_config(path / TRANSFORMER_CONFIG):
        return path, path / "transformer"
    if _is_dit_config(path / "config.json"):
        return path, path
    return None


def _resolve(spec: str | Path) -> tuple[Path, Path]:
    path = Path(spec).expanduser()
    found = _find(path) if path.is_dir() else None
    if found is not None:
        return found
    for name in (TRANSFORMER_CONFIG, "config.json"):
        if (path / name).is_file():
            kind = read_json_object(path / name).get("_class_name") or read_json_object(path / name).get("architectures")
            raise UserError(f"{path / name} describes {kind!r}, not a {DIT_CLASS}; foundry loads DiTs from it only")
    if (path / MODEL_INDEX).is_file():
        raise UserError(f"{path} is an incomplete DiT directory: {TRANSFORMER_CONFIG} missing")
    if path.is_dir():
        raise UserError(f"{path} is not a DiT directory (no {MODEL_INDEX} with {TRANSFORMER_CONFIG}), nor a run "
                        f"directory whose newest checkpoint is one")
    raise UserError(f"DiT {str(spec)!r} not found: give a DiT directory (with {MODEL_INDEX}) or a run directory")


def _load_weights(model: DiT, path: Path, device: str | torch.device, dtype: torch.dtype | None) -> None:
    expected = {name: t.shape for name, t in model.state_dict().items()}
    state = checked_state(read_tensors("safetensors", [path]), expected, str(path), "its config.json", device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_positions(device)  # the fixed table was built on the meta device


def load_dit(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedDiT:
    """A DiT directory (or a run directory's newest checkpoint of one) in eval mode; dtype None keeps the file's.

    Also loads a bare diffusers DiTTransformer2DModel folder; without scheduler/scheduler_config.json the schedule
    is DDIMScheduler's defaults."""
    model_dir, transformer_dir = _resolve(spec)
    weights = transformer_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{transformer_dir} has no {WEIGHTS_NAME}: the DiT directory is incomplete"
                        + (" (sharded or .bin weights are not read)" if any(transformer_dir.glob("*.bin*"))
                           or any(transformer_dir.glob("*.index.json")) else ""))
    config_path = transformer_dir / "config.json"
    config = DiTConfig.from_diffusers_dict(read_json_object(config_path), str(config_path))
    scheduler = model_dir / SCHEDULER_CONFIG
    schedule = (NoiseSchedule.from_scheduler_config(read_json_object(scheduler), str(scheduler)) if scheduler.is_file()
                else NoiseSchedule.from_scheduler_config({}))
    with torch.device("meta"):
        model = DiT(config)
    _load_weights(model, weights, device, dtype)
    model.eval()
    meta = read_json_object(model_dir / "foundry.json") if (model_dir / "foundry.json").is_file() else {}
    return LoadedDiT(model, schedule, model_dir, meta)


__all__ = ["LoadedDiT", "is_dit_dir", "load_dit", "model_index", "save_dit", "write_dit_files"]
