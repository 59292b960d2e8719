"""A decoder layer: attention then MLP (dense or mixture of experts), each residual, norms where the family puts them."""

from __future__ import annotations

import torch
from torch import nn

from foundry.config import ModelConfig
from foundry.model.kv_cache import KVCache
from foundry.model.latent_attention import LatentAttention
from foundry.model.layers import MLP, Attention, make_norm
from foundry.model.moe import SparseMoE

# Which Hugging Face norm module sits where, per norm_placement. Llama's post_attention_layernorm is the
# MLP's input norm, while in OLMo 2 and Gemma the same name normalises the attention output.
NORM_NAMES = {
    "pre": {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
    "post": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
    "sandwich": {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                 "mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"},
}


class DecoderLayer(nn.Module):
    """Residual block: attention, then MLP, each with its norms where the family places them."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.norm_names = NORM_NAMES[config.norm_placement]
        for name in self.norm_names.values():
            self.add_module(name, make_norm(config))
        self.self_attn = LatentAttention(config, layer) if config.kv_lora_rank else Attention(config, layer)
        self.mlp = SparseMoE(config) if config.is_moe_layer(layer) else MLP(config)

    def _norm(self, role: str, x: torch.Tensor) -> torch.Tensor:
        name = self.norm_names.get(role)
        return x if name is None else getattr(self, name)(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        x = x + self._norm("attn_out", self.self_attn(self._norm("attn_in", x), cos, sin, mask, cache))
        return x + self._norm("mlp_out", self.mlp(self._norm("mlp_in", x)))
