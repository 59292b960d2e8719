"""A KV cache whose decode steps have fixed shapes: the prerequisite for compiling the decode step."""

from __future__ import annotations

import torch

from foundry.config import ModelConfig
from foundry.model import KVCache


class StaticKVCache(KVCache):
    """KVCache whose one-token steps keep every tensor shape fixed and allocate nothing.

    Attention always spans all `max_len` slots; unwritten slots are invalid, so the mask hides
    them. A decode step writes its slot with `index_copy_` at a position held in a tensor
    (`slot`), and its mask is a view of `valid`, so one graph serves every step. Prompts
    (more than one token) go through the ordinary slicing path."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(config, batch_size, max_len, device, dtype)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # == length, as a tensor

    def reserve(self, new_tokens: int, pad_mask: torch.Tensor | None) -> None:
        """Mark the next slots as written (real where pad_mask is True)."""
        if new_tokens != 1 or pad_mask is not None:
            return super().reserve(new_tokens, pad_mask)
        if self.length >= self.max_len:
            raise ValueError(f"KV cache full: {self.length + 1} tokens exceed its {self.max_len} slots")
        self.valid.index_fill_(1, self.slot, True)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v [B, kv, T, hd]; return the whole buffers (every slot, written or not)."""
        if k.shape[2] == 1:
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
        else:
            super().write(layer, k, v)
        return self.keys[layer], self.values[layer]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
        self.slot += new_tokens

    def attention_mask(self, new_tokens: int, window: int | None = None) -> torch.Tensor:
        """Boolean mask [B, 1, T, max_len] over all slots; for one new token, a view of `valid`."""
        if new_tokens == 1 and window is None:
            # The new token sits in the newest written slot: every valid slot is at or before it.
            return self.valid[:, None, None, :]
        key_slot = torch.arange(self.max_len, device=self.valid.device)[None, :]
        query_slot = self.slot + torch.arange(new_tokens, device=self.valid.device)[:, None]
        causal = key_slot <= query_slot
        if window is not None:
            causal &= key_slot > query_slot - window
        allowed = causal[None] & self.valid[:, None, :]
        allowed |= (key_slot == query_slot)[None]  # a padding query sees itself (no NaN softmax)
        return allowed[:, None]
