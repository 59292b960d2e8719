"""A class-conditional diffusion transformer (DiT, Peebles & Xie 2023) computed as diffusers'
DiTTransformer2DModel computes it.

The module tree is named so that `state_dict()` IS the diffusers file (transformer/diffusion_pytorch_model.
safetensors): no name mapping anywhere. diffusers' layout has two quirks kept here for that reason:
- every block carries its own timestep + label embedding (`transformer_blocks.{i}.norm1.emb`), and the final
  adaptive LayerNorm is conditioned on block 0's;
- the label table always has num_classes + 1 rows (the last, id num_classes, is the null class of classifier-free
  guidance), whatever the label dropout.
The 2-D sin-cos position table is a non-persistent buffer, as in diffusers: it is never in the file.

Unlike diffusers, `forward` never drops labels in training mode: the training loop does that with
`drop_labels` (seeded there), so a forward pass is a pure function of its inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foundry.config.vision_config import DiTConfig
from foundry.model.encoder_attention import encoder_attention

TIMESTEP_CHANNELS = 256  # width of the sinusoidal timestep features (diffusers' Timesteps(256, ...))
_FIXED_EPS = 1e-6  # diffusers' adaLN-Zero and output LayerNorms use this, not config.norm_eps


def sincos_position_table(embed_dim: int, grid: int) -> torch.Tensor:
    """[grid * grid, embed_dim] fixed positions of a grid x grid patch raster (row-major), float32.

    The first half of each row encodes the patch's column, the second its row (MAE's and diffusers' order),
    each as [sin, cos] of position / 10000^(2i/d); computed in float64 as diffusers does."""
    omega = torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4)
    omega = 1.0 / 10000**omega
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = torch.outer(pos.reshape(-1), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def timestep_features(timestep: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """[B, channels] sinusoidal features of (possibly fractional) timesteps [B]: [cos, sin] of t * 10000^(-i/(h-1)),
    diffusers' get_timestep_embedding with flip_sin_to_cos=True, downscale_freq_shift=1."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / (half - 1)
    args = timestep[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    """Patchify: a stride-p convolution to inner_dim channels, flattened to tokens, plus the fixed position table."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, p = config.inner_dim, config.patch_size
        self.proj = nn.Conv2d(config.in_channels, dim, kernel_size=p, stride=p)
        grid = config.sample_size // p
        self.register_buffer("pos_embed", sincos_position_table(dim, grid).unsqueeze(0), persistent=False)

    def init_positions(self, device: torch.device | str | None = None) -> None:
        """Rebuild the position table (a model built on the meta device has none)."""
        grid = int(round(self.pos_embed.shape[1] ** 0.5))
        self.pos_embed = sincos_position_table(self.pos_embed.shape[-1], grid).unsqueeze(0).to(device)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(sample).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, D]
        return (tokens + self.pos_embed).to(tokens.dtype)  # the table stays float32, as diffusers keeps it


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features through a two-layer SiLU MLP (diffusers' TimestepEmbedding)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class LabelEmbedder(nn.Module):
    """A table of num_classes + 1 label vectors; the last row is the null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(class_labels)


class Conditioning(nn.Module):
    """timestep embedding + label embedding: the vector [B, D] that modulates a block."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(config.inner_dim)
        self.class_embedder = LabelEmbedder(config.num_classes, config.inner_dim)

    def forward(self, timestep: torch.Tensor, class_labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_features(timestep).to(dtype)) + self.class_embedder(class_labels)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: from the conditioning, six [B, D] vectors (shift, scale, gate of attention and of the MLP);
    the block input LayerNorm-ed and modulated by the first two."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.inner_dim
        self.emb = Conditioning(config)
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=_FIXED_EPS)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(cond)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class SelfAttention(nn.Module):
    """Multi-head self-attention over the patch tokens, biased q/k/v/out projections (diffusers' Attention)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.inner_dim
        self.heads = config.num_attention_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.0 (to_out.1 is a dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = encoder_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, d))


class GELUProjection(nn.Module):
    """The MLP's first linear followed by tanh-approximated GELU (diffusers' GELU module, `net.0`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """D -> 4D -> D MLP; `net` keeps diffusers' indices (0: projection + GELU, 1: dropout, 2: output linear)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (diffusers' BasicTransformerBlock with norm_type "ada_norm_zero")."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.norm1 = AdaLayerNormZero(config)
        self.attn1 = SelfAttention(config)
        self.norm3 = nn.LayerNorm(config.inner_dim, eps=config.norm_eps, elementwise_affine=False)
        self.ff = FeedForward(config.inner_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, cond)
        x = x + gate_msa[:, None] * self.attn1(h)
        h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


class DiT(nn.Module):
    """Patchify (conv) + fixed 2-D sin-cos positions, adaLN-Zero blocks conditioned on timestep + class, a final
    adaptive LayerNorm and linear, unpatchify: diffusers' DiTTransformer2DModel computed the same way.

    Predicts the noise (or v) of a noisy batch [B, C, H, W] at timesteps [B] for labels [B] in 0..num_classes
    (num_classes: the null class)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim, p = config.inner_dim, config.patch_size
        self.pos_embed = PatchEmbed(config)
        self.transformer_blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_layers)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=_FIXED_EPS)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, p * p * config.in_channels)

    @property
    def null_class(self) -> int:
        """The label id of "no class" (the table's last row)."""
        return self.config.num_classes

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] noisy images, timesteps [B] (or one for all), labels [B] -> prediction [B, C, H, W]."""
        config = self.config
        if sample.dim() != 4 or tuple(sample.shape[1:]) != (config.in_channels, config.sample_size,
                                                           config.sample_size):
            raise ValueError(f"DiT expects [B, {config.in_channels}, {config.sample_size}, {config.sample_size}] "
                             f"images, got {tuple(sample.shape)}")
        b = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.expand(b) if timestep.dim() == 0 else timestep
        x = self.pos_embed(sample)
        first = None
        for block in self.transformer_blocks:
            cond = block.norm1.emb(timestep, class_labels, x.dtype)  # each block embeds t and the label itself
            first = cond if first is None else first
            x = block(x, cond)
        shift, scale = self.proj_out_1(F.silu(first)).chunk(2, dim=1)  # block 0's conditioning, as diffusers
        x = self.proj_out_2(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])
        return self.unpatchify(x)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, h*w, p*p*C] patch predictions -> [B, C, h*p, w*p] images."""
        p, c = self.config.patch_size, self.config.in_channels
        grid = self.config.sample_size // p
        x = tokens.reshape(-1, grid, grid, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, c, grid * p, grid * p)

    def drop_labels(self, class_labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Labels with each replaced by the null class with probability class_dropout_prob (training for
        classifier-free guidance); unchanged when the config has no null class."""
        prob = self.config.class_dropout_prob
        if prob <= 0:
            return class_labels
        device = generator.device if generator is not None else class_labels.device
        drop = torch.rand(class_labels.shape, generator=generator, device=device).to(class_labels.device) < prob
        return torch.where(drop, torch.full_like(class_labels, self.null_class), class_labels)

    def init_positions(self, device: torch.device | str | None = None) -> None:
        """Rebuild the fixed position table (after building on the meta device)."""
        self.pos_embed.init_positions(device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """The DiT paper's initialisation: xavier-uniform linears (and the patch convolution as one) with zero
        biases, N(0, 0.02) label tables and timestep MLPs, and every adaLN modulation and the output layer zero,
        so that each block starts as the identity and the model predicts zeros."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def fill(tensor: torch.Tensor, init, *args) -> None:
            value = torch.empty(tensor.shape, dtype=torch.float32)
            init(value, *args, generator=gen)
            tensor.copy_(value)

        for module in self.modules():
            if isinstance(module, nn.Linear):
                fill(module.weight, nn.init.xavier_uniform_)
                nn.init.zeros_(module.bias)
        proj = self.pos_embed.proj
        flat = torch.empty(proj.weight.shape[0], proj.weight[0].numel())
        nn.init.xavier_uniform_(flat, generator=gen)
        proj.weight.copy_(flat.view_as(proj.weight))
        nn.init.zeros_(proj.bias)
        for block in self.transformer_blocks:
            fill(block.norm1.emb.class_embedder.embedding_table.weight, nn.init.normal_, 0.0, 0.02)
            fill(block.norm1.emb.timestep_embedder.linear_1.weight, nn.init.normal_, 0.0, 0.02)
            fill(block.norm1.emb.timestep_embedder.linear_2.weight, nn.init.normal_, 0.0, 0.02)
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


__all__ = ["DiT", "sincos_position_table", "timestep_features"]
