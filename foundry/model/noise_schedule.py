"""The forward (noising) process of a diffusion model, with the numbers of diffusers' DDPM/DDIM schedulers.

`NoiseSchedule` is what scheduler/scheduler_config.json of a diffusers pipeline directory says: betas over the
training timesteps and, for sampling, how DDIM spaces its steps. Training uses `add_noise` and `target`;
foundry.infer.diffusion samples with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from foundry.core.errors import UserError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SCHEDULER_CLASS = "DDIMScheduler"
# Scheduler settings whose other values change the numbers in ways foundry does not reproduce.
_UNSUPPORTED = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False,
                "clip_sample_range": 1.0}


def _cosine_betas(steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule as betas (diffusers' betas_for_alpha_bar, in Python floats)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                        dtype=torch.float32)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values [B] shaped to broadcast over a batch like `like` [B, ...]."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class NoiseSchedule:
    """DDPM's forward process: betas over num_train_timesteps, alphas_cumprod; the same numbers as diffusers'
    DDPMScheduler/DDIMScheduler for the same config (float32, as diffusers computes them).

    x_t = sqrt(alphas_cumprod[t]) x_0 + sqrt(1 - alphas_cumprod[t]) noise. The last four fields say how DDIM
    samples: which timesteps it visits (timestep_spacing + steps_offset, diffusers' set_timesteps), whether the
    step past t=0 lands on alpha 1, and whether the predicted x_0 is clamped to [-1, 1] at every step."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # also "scaled_linear", "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # or "v_prediction"
    timestep_spacing: str = "trailing"  # starts sampling at the last timestep, whatever the step count
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False

    def __post_init__(self) -> None:
        where = "noise schedule"
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise UserError(f"{where}: num_train_timesteps must be an integer of at least 2, "
                            f"got {self.num_train_timesteps!r}")
        for name, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                              ("timestep_spacing", TIMESTEP_SPACINGS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{where}: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise UserError(f"{where}: {name} must be in (0, 1), got {value!r}")
        if self.beta_start > self.beta_end:
            raise UserError(f"{where}: beta_start ({self.beta_start}) is above beta_end ({self.beta_end})")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise UserError(f"{where}: steps_offset must be a non-negative integer, got {self.steps_offset!r}")

    @property
    def betas(self) -> torch.Tensor:
        """[num_train_timesteps] float32 noise variances per step."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        return _cosine_betas(n)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """[num_train_timesteps] float32 products of (1 - beta) up to each step: the signal left at t."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for clean images x0 [B, ...], noise like x0 and timesteps t [B] (in x0's dtype, as diffusers)."""
        alphas = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
        return _per_sample(alphas**0.5, x0) * x0 + _per_sample((1 - alphas) ** 0.5, x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to predict at x_t: the noise (epsilon), or v = sqrt(a) noise - sqrt(1 - a) x0."""
        if self.prediction_type == "epsilon":
            return noise
        alphas = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
        return _per_sample(alphas**0.5, x0) * noise - _per_sample((1 - alphas) ** 0.5, x0) * x0

    def random_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """[batch] training timesteps drawn uniformly from 0..num_train_timesteps-1 (on the generator's device,
        then moved to `device`)."""
        where = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=where)
        return t.to(device) if device is not None else t

    def to_scheduler_config(self) -> dict[str, Any]:
        """scheduler/scheduler_config.json contents for diffusers' DDIMScheduler: every argument it takes."""
        return {"_class_name": SCHEDULER_CLASS, "num_train_timesteps": self.num_train_timesteps,
                "beta_start": self.beta_start, "beta_end": self.beta_end, "beta_schedule": self.beta_schedule,
                "trained_betas": None, "clip_sample": self.clip_sample, "set_alpha_to_one": self.set_alpha_to_one,
                "steps_offset": self.steps_offset, "prediction_type": self.prediction_type, "thresholding": False,
                "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
                "timestep_spacing": self.timestep_spacing, "rescale_betas_zero_snr": False}

    @classmethod
    def from_scheduler_config(cls, raw: dict[str, Any], where: str = "scheduler/scheduler_config.json"
                              ) -> "NoiseSchedule":
        """Read a diffusers scheduler config (DDIMScheduler's, or another scheduler's over the same betas);
        missing keys take DDIMScheduler's defaults."""
        if not isinstance(raw, dict):
            raise UserError(f"{where} is not a JSON object")
        for key, default in _UNSUPPORTED.items():
            if raw.get(key, default) != default:
                raise UserError(f"{where}: {key} is {raw[key]!r}; foundry's sampler supports only {key} {default!r}")
        defaults = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0,
                    "set_alpha_to_one": True, "clip_sample": True}
        values = {name: raw.get(name, default) for name, default in defaults.items()}
        for name in ("set_alpha_to_one", "clip_sample"):
            if not isinstance(values[name], bool):
                raise UserError(f"{where}: {name} must be true or false, got {values[name]!r}")
        try:
            return cls(**values)
        except UserError as exc:
            raise UserError(f"{where}: {str(exc).removeprefix('noise schedule: ')}") from None


__all__ = ["NoiseSchedule", "BETA_SCHEDULES", "PREDICTION_TYPES", "TIMESTEP_SPACINGS", "SCHEDULER_CLASS"]
