"""The decoder-only transformer, with Hugging Face parameter names (`LlamaForCausalLM`'s, plus each family's
extra modules under their own Hugging Face names)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from foundry.config import ModelConfig
from foundry.model.kv_cache import KVCache
from foundry.model.decoder_layer import DecoderLayer
from foundry.model.layers import make_norm
from foundry.model.rope import attention_factor, inverse_frequencies, long_context_threshold, rotary_cos_sin


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)


class Transformer(nn.Module):
    """A decoder-only causal language model (Llama, Mistral, Qwen, Phi-3, Gemma, OLMo 2, GPT-2; the mixtures of
    experts Mixtral, Qwen-MoE and DeepSeek-V3):
    token ids in, next-token logits out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.layer_types = [config.layer_type(i) for i in range(config.num_hidden_layers)]
        self.activation_checkpointing = False
        self.init_rotary()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding table with the output head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rotary(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary frequencies, e.g. after building on the meta device.

        `inv_freq` serves full-attention layers; `inv_freq_sliding` sliding ones when their base differs
        (Gemma 3); `inv_freq_long` LongRoPE's set for positions past the original context (Phi-3)."""
        if self.config.position_embedding != "rope":
            return
        if device is None:
            device = self.model.embed_tokens.weight.device
        buffers = {"inv_freq": inverse_frequencies(self.config)}
        if self.config.sliding_rope_theta is not None:
            buffers["inv_freq_sliding"] = inverse_frequencies(self.config, "sliding_attention")
        if long_context_threshold(self.config) is not None:
            buffers["inv_freq_long"] = inverse_frequencies(self.config, long=True)
        for name, value in buffers.items():
            self.register_buffer(name, value.to(device), persistent=False)

    def initial_values(self, seed: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, fresh value) for every parameter in order, drawn one at a time on the CPU: N(0, 0.02), residual
        outputs scaled by 1/sqrt(2L) (GPT-2), norms at their identity. Whoever holds the parameters (whole, or
        sharded across devices) copies each value in; the draws never depend on where the weights live."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                value = 0.0 if self.config.norm_unit_offset and self.config.norm_type == "rms" else 1.0
                yield name, torch.full(param.shape, value)
            elif name.endswith(".bias"):
                yield name, torch.zeros(param.shape)
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                yield name, torch.randn(param.shape, generator=gen) * s

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Fresh initialisation (see initial_values), then the rotary buffers."""
        params = dict(self.named_parameters())
        for name, value in self.initial_values(seed):
            params[name].copy_(value)
        for name, buffer in self.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's routing bias starts neutral
                buffer.zero_()
        self.init_rotary()

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        # (cos, sin) per layer type in use.
        inv_freq = self.inv_freq
        threshold = long_context_threshold(self.config)
        if threshold is not None:
            # LongRoPE picks its factor set per sequence, by that sequence's length (its last position + 1), as
            # transformers does for one sequence; never by the longest row of the batch. [B, 1, rotary_dim/2]
            long = positions.amax(dim=1) + 1 > threshold
            inv_freq = torch.where(long[:, None, None], self.inv_freq_long, self.inv_freq)
        sliding = getattr(self, "inv_freq_sliding", None)
        out = {}
        for kind in set(self.layer_types):
            freqs = sliding if kind == "sliding_attention" and sliding is not None else inv_freq
            out[kind] = rotary_cos_sin(freqs, positions, dtype, attention_factor(self.config, kind))
        return out

    def _masks(self, t: int, cache: KVCache | None, pad_mask: torch.Tensor | None,
               device: torch.device, segments: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        # Boolean attention masks per layer type; None means plain causal attention.
        out: dict[str, torch.Tensor | None] = {}
        for kind in set(self.layer_types):
            window = self.config.sliding_window if kind == "sliding_attention" else None
            if cache is not None:
                out[kind] = cache.attention_mask(t, window)
            elif pad_mask is None and window is None and segments is None:
                out[kind] = None
            else:
                allowed = torch.ones(t, t, dtype=torch.bool, device=device).tril()
                if window is not None:
                    allowed = allowed.triu(diagonal=1 - window)
                if segments is not None:
                    # Segments are contiguous, so the window counted in row slots is the one within the example;
                    # each token sees itself, so no query is left without a key.
                    allowed = allowed[None] & (segments[:, :, None] == segments[:, None, :])
                    if pad_mask is not None:
                        allowed = (allowed & pad_mask[:, None, :]) | torch.eye(t, dtype=torch.bool, device=device)
                    out[kind] = allowed[:, None]
                elif pad_mask is None:
                    out[kind] = allowed[None, None]
                else:
                    # A padding query would see no key at all (NaN softmax); let it see itself.
                    allowed = (allowed[None] & pad_mask[:, None, :]) | torch.eye(t, dtype=torch.bool, device=device)
                    out[kind] = allowed[:, None]
        return out

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None, pad_mask: torch.Tensor | None = None, *,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] for token ids [B, T].

        positions: position ids [B, T] (default: the cache length onwards).
        cache: a KVCache to read and extend (incremental decoding).
        pad_mask: [B, T] True for real tokens, False for left padding.
        segments: [B, T] int, the example each token of a packed row belongs to: a token attends only to
        earlier tokens of its own segment (give padding a segment of its own); positions default to restarting
        at 0 where the segment changes. Not with a cache."""
        b, t = input_ids.shape
        if segments is not None and cache is not None:
            raise ValueError("segments (packed rows) are for training and scoring, not for decoding with a cache")
        start = cache.length if cache is not None else 0
        if positions is None and segments is not None:
            positions = _segment_positions(segments)
        if positions is None:
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        x = self.model.embed_tokens(input_ids)
        if self.config.scale_embeddings:  # Gemma rounds sqrt(hidden) to the weights' dtype first
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        rotary = {}
        if self.config.position_embedding == "learned":
            x = x + self.model.embed_positions(positions)
        else:
            rotary = self._rotary(positions, torch.float32 if self.config.upcast_norm_and_rope else x.dtype)
        if cache is not None:
            cache.reserve(t, pad_mask)
        masks = self._masks(t, cache, pad_mask, x.device, segments)
        for layer, kind in zip(self.model.layers, self.layer_types):
            cos, sin = rotary.get(kind, (None, None))
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, masks[kind], cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[kind], cache)
        if cache is not None:
            cache.advance(t)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for final hidden states: the output head, then the family's soft cap (Gemma 2)."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, pad_mask: torch.Tensor | None = None, *,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T] (see hidden_states for the options)."""
        return self.logits(self.hidden_states(input_ids, positions, cache, pad_mask, segments=segments))


def _segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] that restart at 0 wherever the segment id changes along a row."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values
