"""A preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch

from foundry.config import ModelConfig


class KVCache:
    """Keys and values [B, kv_heads, max_len, head_dim] per layer, filled slot by slot.

    All rows share one write position (`length`); rows of different prompt lengths are
    left-padded and `valid` marks which slots hold real tokens, so padding is never attended."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        heads, key_dim, value_dim = config.kv_cache_shape()  # latent attention: its latent and rotary key
        self.keys = [torch.zeros(batch_size, heads, max_len, key_dim, device=device, dtype=dtype)
                     for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(batch_size, heads, max_len, value_dim, device=device, dtype=dtype)
                       for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def reserve(self, new_tokens: int, pad_mask: torch.Tensor | None) -> None:
        """Mark the next `new_tokens` slots as written (real where pad_mask is True)."""
        end = self.length + new_tokens
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens exceed its {self.max_len} slots")
        self.valid[:, self.length:end] = True if pad_mask is None else pad_mask

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [B, kv, T, hd] for one layer; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def attention_mask(self, new_tokens: int, window: int | None = None) -> torch.Tensor:
        """Boolean mask [B, 1, T, length+T]: causal over slots, padding keys hidden.

        window: a sliding-window layer sees only the `window` newest slots, its own included."""
        end = self.length + new_tokens
        query_slot = torch.arange(self.length, end, device=self.valid.device)[:, None]
        key_slot = torch.arange(end, device=self.valid.device)[None, :]
        causal = key_slot <= query_slot
        if window is not None:
            causal &= key_slot > query_slot - window
        allowed = causal[None] & self.valid[:, None, :end]
        # A padding query would see no key at all (NaN softmax); let it see itself.
        allowed |= (key_slot == query_slot)[None]
        return allowed[:, None]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (e.g. when finished sequences leave a batch)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]
        self.batch_size = len(rows)
