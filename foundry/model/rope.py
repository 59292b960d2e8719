"""Rotary position embeddings (RoPE) and the context-extension schemes of the open model families."""

from __future__ import annotations

import math

import torch

from foundry.config import ModelConfig


def _base_frequencies(theta: float, dim: int) -> torch.Tensor:
    # Computed in fp32 exactly as transformers does, so the angles match bit for bit.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inverse_frequencies(config: ModelConfig, layer_type: str = "full_attention", long: bool = False) -> torch.Tensor:
    """Per-pair rotation frequencies [rotary_dim/2] of one layer type, with the config's rope_scaling applied.

    long: LongRoPE's set for sequences past the original context (the short set otherwise)."""
    dim = config.rotary_dim
    if layer_type == "sliding_attention" and config.sliding_rope_theta is not None:
        return _base_frequencies(config.sliding_rope_theta, dim)  # Gemma 3's local layers: plain RoPE
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "longrope":
        factors = scaling["long_factor" if long else "short_factor"]
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * config.rope_theta ** shape)
    inv_freq = _base_frequencies(config.rope_theta, dim)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    if kind == "yarn":
        return _yarn(config, scaling)
    raise ValueError(f"rope_scaling type {kind!r} is not supported")


def attention_factor(config: ModelConfig, layer_type: str = "full_attention") -> float:
    """The factor YaRN and LongRoPE multiply cos and sin by (1 for the other schemes)."""
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind not in ("yarn", "longrope") or (layer_type == "sliding_attention" and config.sliding_rope_theta):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    if kind == "longrope":
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def yarn_attention_scale(config: ModelConfig) -> float:
    """What DeepSeek multiplies its softmax scale by under scaled RoPE: YaRN's mscale(factor, mscale_all_dim)^2."""
    scaling = config.rope_scaling or {}
    mscale_all_dim = scaling.get("mscale_all_dim")
    if scaling.get("rope_type", "default") == "default" or not mscale_all_dim:
        return 1.0
    return _yarn_mscale(scaling["factor"], mscale_all_dim) ** 2


def long_context_threshold(config: ModelConfig) -> int | None:
    """LongRoPE uses its long factors for a sequence longer than this; None for other schemes."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "longrope":
        return None
    return scaling["original_max_position_embeddings"]


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(config: ModelConfig, s: dict) -> torch.Tensor:
    # YaRN: interpolate (divide by factor) the low frequencies, keep the high ones, ramp linearly between.
    dim, base = config.rotary_dim, config.rope_theta
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or config.max_position_embeddings / original

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rotary_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, rotary_dim] for integer positions [B, T], computed in fp32, times `scale`.

    inv_freq: [rotary_dim/2], or [B, 1, rotary_dim/2] when rows use different sets (LongRoPE).
    sin comes with the rotation's sign folded in (-sin on the first half) for apply_rotary."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, hd/2]
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)[:, None]
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)[:, None]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, hd] by the position angles (Hugging Face's half-split pairing).

    When cos covers fewer channels than hd (partial rotary), the rest pass through unrotated."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    # Swap the halves with a flip: unlike slicing, its backward needs no zero-filled buffers.
    swapped = x.unflatten(-1, (2, rot // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin
