"""The decoder-only transformer, with Hugging Face `LlamaForCausalLM` parameter names."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from foundry.config import ModelConfig
from foundry.model.kv_cache import KVCache
from foundry.model.layers import DecoderLayer, RMSNorm
from foundry.model.rope import inverse_frequencies, rotary_cos_sin


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """A Llama-family causal language model: token ids in, next-token logits out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.num_experts:
            raise NotImplementedError("mixture-of-experts layers are not implemented in the model yet")
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)
        self.activation_checkpointing = False
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding table with the output head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rotary(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary frequencies, e.g. after building on the meta device."""
        device = device if device is not None else self.model.embed_tokens.weight.device
        self.register_buffer("inv_freq", inverse_frequencies(self.config).to(device), persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Fresh initialisation: N(0, 0.02), residual outputs scaled by 1/sqrt(2L) (GPT-2)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                param.copy_(torch.randn(param.shape, generator=gen) * s)
        self.init_rotary()

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] for token ids [B, T].

        positions: RoPE positions [B, T] (default: the cache length onwards).
        cache: a KVCache to read and extend (incremental decoding).
        pad_mask: [B, T] True for real tokens, False for left padding."""
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(self.inv_freq, positions, x.dtype)
        mask = None
        if cache is not None:
            cache.reserve(t, pad_mask)
            mask = cache.attention_mask(t)
        elif pad_mask is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = (causal[None] & pad_mask[:, None, :]) | torch.eye(t, dtype=torch.bool, device=x.device)
            mask = mask[:, None]
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(t)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T] (see hidden_states for the options)."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache, pad_mask))
