"""Sampling images from a class-conditional DiT: DDIM (Song et al. 2020) with classifier-free guidance.

Each step is diffusers' DDIMScheduler.step computed the same way, including its choice of the previous timestep:
t - num_train_timesteps // steps (exactly the next visited timestep when steps divides num_train_timesteps;
diffusers keeps that rule for every spacing, and so does this sampler). Scheduler arithmetic runs in float32
whatever the model's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from foundry.core.errors import UserError
from foundry.model.dit import DiT
from foundry.model.noise_schedule import NoiseSchedule


def ddim_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """The timesteps DDIM visits, first to last: the same as DDIMScheduler.set_timesteps(steps)."""
    total = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise UserError(f"sampling steps must be an integer in 1..{total} (the schedule's training timesteps), "
                        f"got {steps!r}")
    if schedule.timestep_spacing == "linspace":
        timesteps = np.linspace(0, total - 1, steps).round()[::-1].astype(np.int64)
    elif schedule.timestep_spacing == "leading":
        timesteps = (np.arange(0, steps) * (total // steps)).round()[::-1].astype(np.int64) + schedule.steps_offset
    else:  # trailing
        timesteps = np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1
    return [int(t) for t in timesteps]


def _checked_labels(model: DiT, class_labels: torch.Tensor, guidance: float) -> torch.Tensor:
    config = model.config
    labels = torch.as_tensor(class_labels)
    if labels.dim() != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise UserError(f"class labels must be a non-empty 1-D tensor of integer class ids, got shape "
                        f"{tuple(labels.shape)} of {labels.dtype}")
    if not math.isfinite(guidance):
        raise UserError(f"guidance must be a finite number, got {guidance!r}")
    if guidance != 1 and not config.has_null_class:
        raise UserError(f"guidance {guidance} needs a model trained with label dropout (a null class); this one has "
                        f"class_dropout_prob 0: sample with guidance 1")
    top = config.num_classes if config.has_null_class else config.num_classes - 1
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > top:
        bad = low if low < 0 else high
        null = f" or {config.num_classes} (the null class: unconditional)" if config.has_null_class else ""
        raise UserError(f"class id {bad} is out of range: the model has classes 0..{config.num_classes - 1}{null}")
    return labels.long()


def _initial_noise(shape: tuple[int, ...], noise: torch.Tensor | None, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise UserError(f"initial noise has shape {tuple(noise.shape)}; these labels and this model need {shape}")
        return noise.to(device=device, dtype=torch.float32)
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(device)


@torch.no_grad()
def sample(model: DiT, schedule: NoiseSchedule, class_labels: torch.Tensor, steps: int = 50, guidance: float = 1.0,
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
           eta: float = 0.0) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] (clamped) for class ids [B], by DDIM from `noise` (else drawn with
    `generator`) over `steps` steps. eta 0 is deterministic; eta 1 is DDPM-like (fresh noise from `generator`
    each step). guidance != 1 mixes eps = eps_null + guidance * (eps_class - eps_null), the conditional and
    null-class passes batched together."""
    config = model.config
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise UserError(f"eta must be a non-negative number, got {eta!r}")
    timesteps = ddim_timesteps(schedule, steps)
    labels = _checked_labels(model, class_labels, guidance)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    labels = labels.to(device)
    b = labels.shape[0]
    x = _initial_noise((b, config.in_channels, config.sample_size, config.sample_size), noise, generator, device)
    guided = guidance != 1
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
    alphas = schedule.alphas_cumprod.to(device)
    final_alpha = torch.tensor(1.0, device=device) if schedule.set_alpha_to_one else alphas[0]
    stride = schedule.num_train_timesteps // steps
    for t in timesteps:
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.full((x_in.shape[0],), t, device=device, dtype=torch.long)
        out = model(x_in.to(dtype), t_in, labels).float()
        if guided:
            cond, null = out.chunk(2)
            out = null + guidance * (cond - null)
        prev = t - stride
        alpha, alpha_prev = alphas[t], (alphas[prev] if prev >= 0 else final_alpha)
        beta = 1 - alpha
        if schedule.prediction_type == "epsilon":
            x0, eps = (x - beta**0.5 * out) / alpha**0.5, out
        else:  # v_prediction
            x0, eps = alpha**0.5 * x - beta**0.5 * out, alpha**0.5 * out + beta**0.5 * x
        if schedule.clip_sample:
            x0 = x0.clamp(-1, 1)
        variance = (1 - alpha_prev) / beta * (1 - alpha / alpha_prev)
        std = eta * variance**0.5
        x = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
        if eta > 0:
            where = generator.device if generator is not None else device
            x = x + std * torch.randn(x.shape, generator=generator, device=where, dtype=torch.float32).to(device)
    return x.clamp(-1, 1)


__all__ = ["ddim_timesteps", "sample"]
