"""Vision models through the one loop: a ViT classifier (images -> labels) and a class-conditional DiT
(denoising), each as a RunSetup: the images split and batched, the objective, the held-out evaluation and the
checkpoint files (transformers' ViTForImageClassification layout; diffusers' DiT layout).

Both start from a preset (`vit-tiny`, `dit-tiny`) or from a model directory of their kind, and train with
`foundry pretrain` (or `foundry finetune --recipe classify` for a ViT directory)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from foundry.config.vision_config import DiTConfig, ImageProcessing, ViTConfig, vision_preset
from foundry.core.errors import UserError
from foundry.data.images import ImageBatches, ImageSet, eval_image_batches, read_images, stratified_split
from foundry.hub.diffusion import is_dit_dir, load_dit, write_dit_files
from foundry.hub.vision import is_vit_dir, load_vit, write_vit_files
from foundry.model.dit import DiT
from foundry.model.noise_schedule import NoiseSchedule
from foundry.model.vit import ViT
from foundry.train.config import TrainConfig, save_run_yaml
from foundry.train.objectives import Validation
from foundry.train.parallel.world import World
from foundry.train.setup import (RunSetup, _locate_run, _make_run_dir, join_world, local_batch_size, resume_history,
                                 uses_bf16)
from foundry.train.speed import configure_fp32_matmul

VAL_SEED = 20240  # the held-out denoising draws: one fixed set, so evaluations compare over a run


def vision_kind(spec: str | Path) -> str | None:
    """"classify" (a ViT), "diffusion" (a DiT) or None (not a vision model) for a preset name or directory."""
    preset = vision_preset(str(spec))
    if isinstance(preset, ViTConfig):
        return "classify"
    if isinstance(preset, DiTConfig):
        return "diffusion"
    path = Path(spec)
    if path.is_dir():
        if is_vit_dir(path):
            return "classify"
        if is_dit_dir(path):
            return "diffusion"
    return None


def processing_for(size: int, channels: int) -> ImageProcessing:
    """Pixels scaled to [-1, 1] (mean = std = 0.5), as ViTImageProcessor's defaults and DDPM's data range."""
    return ImageProcessing(size=size, num_channels=channels, image_mean=[0.5] * channels, image_std=[0.5] * channels)


# ---- objectives and their held-out evaluation ---------------------------------------------------------

class ImageClassifyLoss(nn.Module):
    """Cross-entropy of a ViT's logits against the labels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(pixels).float(), labels)


class DenoisingLoss(nn.Module):
    """DDPM's simple objective (Ho et al. 2020, eq. 14): the mean squared error between what the model predicts
    from x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise at a uniform timestep t and its target (the noise for epsilon
    prediction); with a null class, each label is dropped to it with probability `class_dropout`, which trains
    the unconditional model that classifier-free guidance needs (Ho & Salimans 2022)."""

    def __init__(self, model: DiT, schedule: NoiseSchedule, class_dropout: float, null_class: int | None):
        super().__init__()
        self.model, self.schedule = model, schedule
        self.class_dropout, self.null_class = class_dropout, null_class

    def loss(self, x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None and self.null_class is not None:
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        x_t = self.schedule.add_noise(x0, noise, t)
        return F.mse_loss(self.model(x_t, t, labels).float(), self.schedule.target(x0, noise, t).float())

    def forward(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.schedule.num_train_timesteps, (len(x0),), device=x0.device)
        drop = torch.rand(len(x0), device=x0.device) < self.class_dropout if self.class_dropout > 0 else None
        return self.loss(x0, labels, t, torch.randn_like(x0), drop)


@torch.no_grad()
def validate_images(model: ViT, pixels: torch.Tensor, label_ids: list[int], labels: list[str], device: torch.device,
                    batch_size: int) -> Validation:
    """Mean cross-entropy, accuracy and macro-F1 of a classifier over the held-out images."""
    from foundry.eval.classification import classification_report

    model.eval()
    total, predicted = 0.0, []
    for x, y in eval_image_batches(pixels, label_ids, batch_size):
        logits = model(x.to(device)).float()
        total += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
        predicted += logits.argmax(dim=-1).tolist()
    report = classification_report(label_ids, predicted, labels)
    return Validation(total / len(label_ids), len(label_ids), {"accuracy": report.accuracy,
                                                               "macro_f1": report.macro_f1})


@torch.no_grad()
def validate_denoising(objective: DenoisingLoss, pixels: torch.Tensor, label_ids: list[int], device: torch.device,
                       batch_size: int) -> Validation:
    """The denoising loss over the held-out images at one fixed draw of timesteps and noise (labels kept)."""
    objective.model.eval()
    generator = torch.Generator().manual_seed(VAL_SEED)
    t = torch.randint(0, objective.schedule.num_train_timesteps, (len(pixels),), generator=generator)
    noise = torch.randn(pixels.shape, generator=generator)
    total = 0.0
    for first in range(0, len(pixels), batch_size):
        rows = slice(first, first + batch_size)
        x0, y = pixels[rows].to(device), torch.tensor(label_ids[rows], device=device)
        total += float(objective.loss(x0, y, t[rows].to(device), noise[rows].to(device))) * len(x0)
    return Validation(total / len(pixels), len(pixels))


# ---- the run ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class VisionRun:
    """A vision run's own parts (RunSetup.recipe), for its end-of-run report."""

    kind: str  # "classify" or "diffusion"
    data: VisionData


@dataclasses.dataclass
class VisionData:
    """The run's images, split: what the report and the baselines read after training."""

    images: ImageSet
    labels: list[str]
    processing: ImageProcessing
    train_pixels: torch.Tensor
    train_ids: list[int]
    val_pixels: torch.Tensor
    val_ids: list[int]


def _split(images: ImageSet, labels: list[str], processing: ImageProcessing, val_fraction: float,
           seed: int) -> VisionData:
    ids = images.label_ids(labels)
    train, val = stratified_split(images.labels, val_fraction, seed)
    pixels = images.pixels(processing)
    return VisionData(images, labels, processing, pixels[train], [ids[i] for i in train],
                      pixels[val], [ids[i] for i in val])


def _check_layout(cfg: TrainConfig, world: World) -> None:
    if world.tp > 1 or world.ep > 1 or (world.dp > 1 and cfg.parallel == "fsdp"):
        raise UserError("vision models train across processes as DDP replicas (--parallel ddp, what auto means "
                        "here); --parallel fsdp, --tp and --ep are for the language models: drop them")


def _starting_model(kind: str, cfg: TrainConfig, source: Path | None, images: ImageSet, device: torch.device,
                    notes: list[str]) -> tuple[nn.Module, ImageProcessing, list[str], NoiseSchedule | None]:
    """(model, its image processing, its labels, its noise schedule) from a directory, or fresh from the preset."""
    if source is not None and kind == "classify":
        loaded = load_vit(source, device=device, dtype=torch.float32)
        model, labels = loaded.model, list(loaded.model.config.labels)
        if set(images.label_set) - set(labels):  # other classes than the model's: a new head over the same body
            notes.append(f"the data's labels ({', '.join(images.label_set)}) are not all among {source}'s "
                         f"({', '.join(labels)}): training a new classification head for them")
            labels = list(images.label_set)
            model.replace_head(labels, cfg.seed)
        return model, loaded.processing, labels, None
    if source is not None:
        loaded = load_dit(source, device=device, dtype=torch.float32)
        return loaded.model, processing_for(loaded.model.config.sample_size, loaded.model.config.in_channels), \
            loaded.labels, loaded.schedule
    config = vision_preset(cfg.model)
    labels = list(images.label_set)
    if kind == "classify":
        config = config.with_labels(labels)
        model = ViT(config)
        processing = processing_for(config.image_size, config.num_channels)
        schedule = None
    else:
        config = dataclasses.replace(config, num_classes=len(labels))
        model = DiT(config)
        processing = processing_for(config.sample_size, config.in_channels)
        schedule = NoiseSchedule()
    model.init_weights(cfg.seed)
    return model.to(device), processing, labels, schedule


def prepare_vision(cfg: TrainConfig, val_fraction: float, world: World | None = None,
                   notes: list[str] | None = None, stage: str = "pretrain") -> RunSetup:
    """Check every input, then build the run of a vision model; nothing is written before the checks pass.

    cfg.model: a vision preset (fresh weights) or a ViT / DiT directory (its weights); cfg.data: `digits`, an
    image folder or a JSONL of image records; val_fraction of each class is held out (seeded by cfg.seed).
    cfg.seq_len is set to the model's tokens per image (patches, and the class token of a ViT)."""
    notes = notes if notes is not None else []
    kind = vision_kind(cfg.model) if cfg.model else None
    if kind is None:
        raise UserError(f"--model {cfg.model!r} is not a vision model: a preset (vit-tiny, dit-tiny) or a ViT / "
                        f"DiT model directory")
    if not cfg.data:
        raise UserError("--data is required: digits, an image folder (root/LABEL/*.png) or a JSONL of "
                        '{"image", "label"} records')
    world = world or join_world(cfg)
    _check_layout(cfg, world)
    run_dir, resume_from = world.run_on_main(lambda: _locate_run(cfg))
    history = world.run_on_main(lambda: resume_history(cfg, run_dir, resume_from))
    device = world.device
    batch_size = local_batch_size(cfg, world)
    configure_fp32_matmul(cfg.fast_fp32, device)
    images = read_images(cfg.data)
    source = resume_from or (Path(cfg.model) if vision_preset(cfg.model) is None else None)
    torch.manual_seed(cfg.seed)
    model, processing, labels, schedule = _starting_model(kind, cfg, source, images, device, notes)
    data = _split(images, labels, processing, val_fraction, cfg.seed)
    if len(set(data.train_ids)) < 2 and kind == "classify":
        raise UserError(f"--data {cfg.data}: a classifier needs images of at least two labels to train on")
    fill = torch.tensor([(0.0 - m) / s for m, s in zip(processing.image_mean, processing.image_std)])
    loader = ImageBatches(data.train_pixels, data.train_ids, batch_size, cfg.seed,
                          shift=cfg.augment_shift, fill=fill, rank=world.dp_rank, world_size=world.dp)
    config = model.config
    if kind == "classify":
        cfg.seq_len = config.num_patches + 1
        objective: nn.Module = ImageClassifyLoss(model)
        validate = (lambda m: validate_images(m, data.val_pixels, data.val_ids, labels, device,  # noqa: E731
                                              cfg.batch_size)) if data.val_ids else None
        write: Callable[[Path, nn.Module, dict[str, Any]], None] = \
            lambda tmp, m, meta: write_vit_files(tmp, m, processing, meta=meta)  # noqa: E731
    else:
        cfg.seq_len = (config.sample_size // config.patch_size) ** 2
        null = config.num_classes if config.has_null_class else None
        objective = DenoisingLoss(model, schedule, config.class_dropout_prob, null)
        validate = (lambda m: validate_denoising(objective, data.val_pixels, data.val_ids, device,  # noqa: E731
                                                 cfg.batch_size)) if data.val_ids else None
        write = lambda tmp, m, meta: write_dit_files(tmp, m, schedule, meta=meta)  # noqa: E731
    world.run_on_main(lambda: _make_run_dir(run_dir, resume_from is not None))
    world.run_on_main(lambda: save_run_yaml(run_dir / "run.yaml", cfg, history))
    torch.manual_seed(cfg.seed)
    count = sum(p.numel() for p in model.parameters())
    notes.append(f"{kind}: {len(data.train_ids)} training images, {len(data.val_ids)} held out "
                 f"({len(labels)} classes; {cfg.seq_len} tokens per image); {count:,} parameters")
    summary = {"data": str(cfg.data), "train_images": len(data.train_ids), "val_images": len(data.val_ids),
               "val_fraction": val_fraction}
    return RunSetup(run_dir, device, uses_bf16(cfg, device), None, model, count, loader, None, None, resume_from, summary,
                    stage=stage, objective=objective, validate=validate, write_model=write, recipe=VisionRun(kind, data),
                    meta={"task": kind, "labels": labels}, world=world, data_parallel="ddp")
