"""The ViT image classifier, with the parameter names transformers' ViTForImageClassification writes to
model.safetensors (`vit.embeddings.*`, `vit.encoder.layer.N.attention.attention.query.*`, `classifier.*`), so a
state dict is a checkpoint as it is."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foundry.config.vision_config import ViTConfig
from foundry.model.encoder_attention import encoder_attention
from foundry.core.errors import UserError
from foundry.model.layers import ACTIVATIONS


class PatchEmbeddings(nn.Module):
    """Each patch_size x patch_size patch to a hidden_size vector: a convolution with stride = kernel = patch."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                    stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # [B, patches, hidden], row by row


class Embeddings(nn.Module):
    """The class token followed by the patches, plus learned positions (interpolated for another grid)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.patch_embeddings = PatchEmbeddings(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """The position table for a height x width image: as stored for the trained size, else the patch part
        resized bicubically to the new grid (transformers' interpolate_pos_encoding, DINO's recipe)."""
        grid = self.config.image_size // self.config.patch_size
        rows, cols = height // self.config.patch_size, width // self.config.patch_size
        # transformers returns the table unchanged only for a square input with as many patches; a non-square one
        # of the same count is still resized (2x8 from 4x4, say)
        if rows * cols == grid * grid and height == width:
            return self.position_embeddings
        table = self.position_embeddings
        patch = table[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(rows, cols), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([table[:, :1], patch], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        patches = self.patch_embeddings(pixel_values)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        table = self.positions(height, width) if interpolate_pos_encoding else self.position_embeddings
        return self.dropout(tokens + table)


class Dense(nn.Module):
    """One linear layer under transformers' `.dense` name (attention output, MLP in and out)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class SelfAttention(nn.Module):
    """Query, key and value projections and bidirectional multi-head attention (no mask: every patch sees all)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        q, k, v = (proj(x).view(batch, tokens, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = encoder_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(batch, tokens, hidden)


class Attention(nn.Module):
    """Self-attention and its output projection (transformers' `attention.attention` and `attention.output`)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.output = Dense(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class EncoderLayer(nn.Module):
    """A pre-norm block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)), dropout on both branches."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = Dense(config.hidden_size, config.intermediate_size)
        self.output = Dense(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.layernorm_before(x)))
        return x + self.dropout(self.output(self.act(self.intermediate(self.layernorm_after(x)))))


class Encoder(nn.Module):
    """The stack of encoder layers (transformers' `encoder.layer.N`)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class ViTBody(nn.Module):
    """Embeddings, encoder and the final LayerNorm (transformers' ViTModel without its pooler, `vit.`)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.layernorm(self.encoder(self.embeddings(pixel_values, interpolate_pos_encoding)))


class ViT(nn.Module):
    """Patch embedding (a conv with stride = patch), a class token, learned positions, pre-norm encoder blocks
    (LayerNorm -> multi-head self-attention -> residual, LayerNorm -> MLP -> residual), a final LayerNorm and a
    linear head on the class token: transformers' ViTForImageClassification, computed the same way."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if not config.labels:
            raise UserError("a ViT classifier needs labels: give the config its class names "
                            "(config.with_labels([...]))")
        self.config = config
        self.vit = ViTBody(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def replace_head(self, labels: list[str], seed: int | None = None) -> None:
        """Classify into `labels` from now on: a fresh head (N(0, initializer_range), zero bias) on the same body,
        as fine-tuning a pretrained ViT on other classes starts."""
        self.config = self.config.with_labels(labels)
        old = self.classifier
        self.classifier = nn.Linear(self.config.hidden_size, len(labels), device=old.weight.device,
                                    dtype=old.weight.dtype)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            self.classifier.weight.copy_(torch.randn(self.classifier.weight.shape, generator=gen)
                                         * self.config.initializer_range)
            self.classifier.bias.zero_()

    def check_pixels(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> None:
        """Raise UserError unless pixel_values is a [B, num_channels, H, W] batch this model can read."""
        config = self.config
        if pixel_values.ndim != 4:
            raise UserError(f"images must be a [batch, channels, height, width] tensor, got shape "
                            f"{list(pixel_values.shape)}")
        channels, height, width = pixel_values.shape[1:]
        if channels != config.num_channels:
            raise UserError(f"the model reads images with {config.num_channels} channel(s), got {channels}; "
                            f"convert them ({'grayscale' if config.num_channels == 1 else 'RGB'}) first")
        if height % config.patch_size or width % config.patch_size:
            raise UserError(f"image size {height}x{width} is not a multiple of the patch size {config.patch_size}; "
                            f"resize the images (to {config.image_size}x{config.image_size})")
        if (height, width) != (config.image_size, config.image_size) and not interpolate_pos_encoding:
            raise UserError(f"image size {height}x{width} differs from the model's {config.image_size}x"
                            f"{config.image_size}; resize the images, or pass interpolate_pos_encoding=True")

    def features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """[B, hidden]: the class token's state after the final LayerNorm, which the head reads."""
        self.check_pixels(pixel_values, interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.classifier.weight.dtype)
        return self.vit(pixel_values, interpolate_pos_encoding)[:, 0]

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """[B, num_labels] logits of a [B, C, H, W] batch of preprocessed images."""
        return self.classifier(self.features(pixel_values, interpolate_pos_encoding))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Fresh initialisation as transformers' ViT: linears and the patch conv N(0, initializer_range) with zero
        biases, LayerNorms at identity, class token and positions truncated normal (std initializer_range, cut at
        +-2). Drawn on the CPU, parameter by parameter, so a seed gives the same model on every device."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        norms = {name for name, module in self.named_modules() if isinstance(module, nn.LayerNorm)}
        for name, param in self.named_parameters():
            owner, _, kind = name.rpartition(".")
            if owner in norms:
                value = torch.ones(param.shape) if kind == "weight" else torch.zeros(param.shape)
            elif name.endswith(("cls_token", "position_embeddings")):
                value = nn.init.trunc_normal_(torch.empty(param.shape), std=std, a=-2.0, b=2.0, generator=gen)
            elif kind == "bias":
                value = torch.zeros(param.shape)
            else:
                value = torch.randn(param.shape, generator=gen) * std
            param.copy_(value)
