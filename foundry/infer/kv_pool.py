"""One persistent key/value pool of fixed size, cut into slots (one per running request) with per-slot lengths.

Why slots and not pages: on CPU, attention (SDPA) wants each row's keys and values as one contiguous run.
With pages, every decode step would first gather each row's pages into such a run, copying the whole
running cache once per layer per step; with slots the decode step attends straight from the pool. The
cost of slots is memory: a slot holds a request's whole `prompt + max_new_tokens`, reserved when it is
admitted, so the pool fits fewer long requests than pages would. The running rows are kept in slots
0..n-1 (a leaving row's hole is filled by the last row), so a decode step reads the pool's first n slots
as a view, never a gather."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from foundry.config import ModelConfig

# Used when the engine is not told a budget: enough for max_batch_size full-context requests, at most this.
DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Key and value bytes one token takes over all layers."""
    return config.kv_cache_values_per_token() * dtype.itemsize


class KVPool:
    """Keys and values [slots, kv_heads, slot_len, head_dim] per layer, allocated once; `lengths[s]` per slot."""

    def __init__(self, config: ModelConfig, budget_bytes: int, max_slots: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, slot_len: int | None = None):
        per_token = bytes_per_token(config, dtype)
        # A slot holds the model's whole context when the budget allows, else as much as it does
        # (or at most `slot_len`: a draft model's pool is cut like its target's).
        longest = config.max_position_embeddings if slot_len is None else min(slot_len, config.max_position_embeddings)
        self.slot_len = max(1, min(longest, budget_bytes // per_token))
        self.num_slots = max(1, min(max_slots, budget_bytes // (per_token * self.slot_len)))
        heads, key_dim, value_dim = config.kv_cache_shape()  # latent attention: its latent and rotary key
        # Zeros, not empty: masked-out slots are still multiplied by 0 in attention, and 0 * NaN is NaN.
        self.keys = [torch.zeros(self.num_slots, heads, self.slot_len, key_dim, device=device, dtype=dtype)
                     for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(self.num_slots, heads, self.slot_len, value_dim, device=device, dtype=dtype)
                       for _ in range(config.num_hidden_layers)]
        self.lengths = [0] * self.num_slots
        self.device = torch.device(device)

    @property
    def nbytes(self) -> int:
        """Bytes the pool's tensors hold (never more than the budget it was given, unless one token exceeds it)."""
        return sum(t.nbytes for t in self.keys + self.values)

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots * self.slot_len

    def copy(self, src: int, dst: int, n: int | None = None) -> None:
        """Copy the first n (default: all written) positions of slot `src` into slot `dst`, which then holds n."""
        n = self.lengths[src] if n is None else n
        for k, v in zip(self.keys, self.values):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src`'s written keys/values into slot `dst` and empty `src`."""
        self.copy(src, dst)
        self.lengths[src] = 0

    def decode_view(self, rows: int) -> "DecodeView":
        """A cache for one new token in each of slots 0..rows-1, each at its own length."""
        return DecodeView(self, rows)

    def prefill_view(self, slot: int) -> "PrefillView":
        """A cache for the next chunk of tokens of one slot."""
        return PrefillView(self, slot)

    def span_view(self, slots: list[int], counts: list[int]) -> SpanView:
        """A cache for counts[i] new tokens in slot slots[i], each row at its own length (speculative steps)."""
        return SpanView(self, slots, counts)


class DecodeView:
    """What the model sees of the pool in a decode step (KVCache's interface): rows 0..n-1, one token each.

    Everything the model call reads is a tensor or an int it may treat as a symbol (`end`), and nothing in
    it loops over the rows, so one compiled graph serves every batch size and length."""

    def __init__(self, pool: KVPool, rows: int):
        self.pool = pool
        self.rows = torch.arange(rows, device=pool.device)
        longest = max(pool.lengths[:rows])
        if longest >= pool.slot_len:  # checked here, on python ints, so that a compiled step has no graph break
            raise ValueError(f"KV slot full: a row exceeds its {pool.slot_len} positions")
        self.positions = torch.tensor(pool.lengths[:rows], device=pool.device)  # where each row writes
        self.end = longest + 1
        self.length = self.end - 1

    def reserve(self, new_tokens: int, pad_mask: torch.Tensor | None) -> None:
        if new_tokens != 1 or pad_mask is not None:
            raise ValueError("a decode step takes one real token per row")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new k/v [n, kv, 1, hd] at its own position; return the rows' keys/values."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        n = len(self.rows)
        if n == 1:  # one row (batch-1 decoding): a plain slice write, no scatter
            keys[:1, :, self.end - 1:self.end] = k
            values[:1, :, self.end - 1:self.end] = v
        else:
            keys[self.rows, :, self.positions] = k[:, :, 0]
            values[self.rows, :, self.positions] = v[:, :, 0]
        return keys[:n, :, :self.end], values[:n, :, :self.end]

    def advance(self, new_tokens: int) -> None:
        """Nothing here: the scheduler counts the step's tokens after the model call (`commit`)."""

    def commit(self) -> None:
        """Count the token each row just wrote."""
        for row in range(len(self.rows)):
            self.pool.lengths[row] += 1

    def attention_mask(self, new_tokens: int, window: int | None = None) -> torch.Tensor | None:
        """[n, 1, 1, end]: each row sees its own written positions and the new one (the newest `window`).

        None (attend to every key) for one row without a window: all its `end` positions are its own."""
        if window is None and len(self.rows) == 1:
            return None
        return position_mask(self.positions[:, None], self.end, window)


def position_mask(positions: torch.Tensor, end: Any, window: int | None = None) -> torch.Tensor:
    """[n, 1, T, end] for tokens at positions [n, T]: each sees keys 0..its own position (the newest `window`)."""
    key = torch.arange(end, device=positions.device)[None, None]
    query = positions[:, :, None]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    return allowed[:, None]


class PrefillView:
    """What the model sees of the pool while one slot takes a chunk of its prompt (KVCache's interface)."""

    def __init__(self, pool: KVPool, slot: int):
        self.pool = pool
        self.slot = slot
        self.length = pool.lengths[slot]

    def reserve(self, new_tokens: int, pad_mask: torch.Tensor | None) -> None:
        if self.length + new_tokens > self.pool.slot_len:
            raise ValueError(f"KV slot full: {self.length + new_tokens} tokens exceed its {self.pool.slot_len}")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end, s = self.length, self.length + k.shape[2], self.slot
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys[s:s + 1, :, start:end] = k
        values[s:s + 1, :, start:end] = v
        return keys[s:s + 1, :, :end], values[s:s + 1, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
        self.pool.lengths[self.slot] = self.length

    def attention_mask(self, new_tokens: int, window: int | None = None) -> torch.Tensor:
        """[1, 1, T, length+T]: causal over the slot's positions (within `window`)."""
        end = self.length + new_tokens
        query = torch.arange(self.length, end, device=self.pool.device)[:, None]
        key = torch.arange(end, device=self.pool.device)[None]
        allowed = key <= query
        if window is not None:
            allowed &= key > query - window
        return allowed[None, None]


class SpanView:
    """What the model sees of the pool when several slots each take a few tokens at once (KVCache's interface).

    Row i feeds counts[i] real tokens (1..T, T the largest count) at positions lengths[slot] onwards. A row
    with fewer than T is padded on the right: a padding query repeats the row's last real position (its
    mask, its rotary), so it attends to real keys only and never makes a NaN, and its key/value is never
    written, so padding costs compute but cannot disturb the pool. The rows need not be slots 0..n-1 (a
    draft model speculates for some rows only); when they are (or there is one row) the keys are read as a
    view, else gathered."""

    def __init__(self, pool: KVPool, slots: list[int], counts: list[int]):
        if not slots or len(slots) != len(counts) or min(counts) < 1:
            raise ValueError("a span step takes at least one token in each of its rows")
        starts = [pool.lengths[s] for s in slots]
        ends = [start + count for start, count in zip(starts, counts)]
        if max(ends) > pool.slot_len:
            raise ValueError(f"KV slot full: a row exceeds its {pool.slot_len} positions")
        self.pool = pool
        self.slots, self.counts = list(slots), list(counts)
        self.width = max(counts)
        device = pool.device
        # Positions [n, T]: where each token sits (padding repeats the row's last real one).
        self.positions = torch.tensor([[start + min(j, c - 1) for j in range(self.width)]
                                       for start, c in zip(starts, counts)], device=device)
        if len(slots) > 1:  # where the real tokens go: their index in the flat [n*T], their slot and position
            real = [(i, j) for i, c in enumerate(counts) for j in range(c)]
            self._real = torch.tensor([i * self.width + j for i, j in real], device=device)
            self._real_slots = torch.tensor([slots[i] for i, _ in real], device=device)
            self._real_positions = torch.tensor([starts[i] + j for i, j in real], device=device)
            self._slots = None if slots == list(range(len(slots))) else torch.tensor(slots, device=device)
        self.end = max(ends)
        self.length = min(starts)  # KVCache's interface; the model is always given explicit positions

    def reserve(self, new_tokens: int, pad_mask: torch.Tensor | None) -> None:
        if new_tokens != self.width or pad_mask is not None:
            raise ValueError(f"a span step takes {self.width} tokens per row (padding is the view's own)")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the real tokens' k/v [n, kv, T, hd] at their positions; return the rows' keys/values."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        n, heads, t, dim = k.shape
        if n == 1:  # one row (batch-1 speculation), never padded: plain slices, no scatter or gather
            s, start = self.slots[0], self.end - t
            keys[s:s + 1, :, start:self.end] = k
            values[s:s + 1, :, start:self.end] = v
            return keys[s:s + 1, :, :self.end], values[s:s + 1, :, :self.end]
        keys[self._real_slots, :, self._real_positions] = k.transpose(1, 2).reshape(n * t, heads, dim)[self._real]
        values[self._real_slots, :, self._real_positions] = (  # latent attention: v is narrower than k
            v.transpose(1, 2).reshape(n * t, heads, v.shape[-1])[self._real])
        if self._slots is None:
            return keys[:n, :, :self.end], values[:n, :, :self.end]
        return keys[self._slots, :, :self.end], values[self._slots, :, :self.end]

    def advance(self, new_tokens: int) -> None:
        """Nothing here: how many of the tokens a row keeps is decided after the call (`commit`, or the caller)."""

    def commit(self) -> None:
        """Count every real token each row just wrote."""
        for slot, count in zip(self.slots, self.counts):
            self.pool.lengths[slot] += count

    def attention_mask(self, new_tokens: int, window: int | None = None) -> torch.Tensor | None:
        """[n, 1, T, end]: causal within each row's own positions (the newest `window` of them).

        None (attend to every key) for one row taking one token without a window, as in DecodeView."""
        if window is None and self.width == 1 and len(self.slots) == 1:
            return None
        return position_mask(self.positions, self.end, window)


class PrefixCache:
    """Finished sequences kept in otherwise idle pool slots, so that a later prompt starting alike reuses their KV.

    An entry is evicted (least recently used first) whenever its slot is wanted by a running request."""

    def __init__(self) -> None:
        self.entries: OrderedDict[int, list[int]] = OrderedDict()  # slot -> the tokens whose KV it holds

    def keep(self, slot: int, tokens: list[int]) -> None:
        """Record that `slot` holds `tokens`' keys/values (newest entry)."""
        self.entries[slot] = tokens
        self.entries.move_to_end(slot)

    def redundant(self, tokens: list[int]) -> int | None:
        """An entry that `tokens` makes useless (a prefix of them), or None; -1 if one already covers them."""
        for slot, held in self.entries.items():
            if held[:len(tokens)] == tokens:
                self.entries.move_to_end(slot)
                return -1
            if tokens[:len(held)] == held:
                return slot
        return None

    def evict(self) -> int | None:
        """Forget the least recently used entry; its slot (None when empty)."""
        if not self.entries:
            return None
        slot, _ = self.entries.popitem(last=False)
        return slot


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
