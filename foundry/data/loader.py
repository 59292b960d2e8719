"""Batches for training and evaluation from token shards: seeded, rank-disjoint and exactly resumable."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from foundry.data.order import EpochOrder
from foundry.data.shards import TokenShards
from foundry.core.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchLoader:
    """Infinite (x, y) batches [batch_size, seq_len] of int64, y being x shifted by one token.

    The token stream is cut into non-overlapping windows of seq_len + 1 tokens. Each epoch visits
    the windows in an order shuffled by (seed, epoch); these orders, one epoch after the other, make one
    global stream of windows. Rank r of world_size takes the stream's windows r, r + world_size, ...:
    ranks never share a window within an epoch, every rank draws a row per world_size windows, so all
    ranks advance in lockstep, and a step's rows over all ranks are the stream's next
    batch_size * world_size windows whatever the world size. That is why a run resumes at another world
    size (with the same global batch) on exactly the windows it would have seen. A batch may straddle
    two epochs.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.shards, self.batch_size, self.seq_len, self.seed = shards, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.window = seq_len + 1
        self.num_windows = len(shards) // self.window
        if self.num_windows < world_size:
            raise UserError(
                f"sequence length {seq_len} is too long for {shards.dir} ({shards.split}: {len(shards):,} tokens, "
                f"{self.num_windows} windows of {self.window} tokens for {world_size} rank(s)); "
                "lower the sequence length or prepare more data")
        self.order = EpochOrder(self.num_windows, seed, rank, world_size, "windows")

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> Batch:
        rows = np.stack([self.shards.read(index * self.window, self.window)
                         for index in self.order.take(self.batch_size)]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    @property
    def epoch(self) -> int:
        return self.order.epoch

    @property
    def position(self) -> int:
        return self.order.position

    @property
    def windows_per_rank(self) -> float:
        """Windows this rank draws per epoch (fractional when world_size does not divide the epoch)."""
        return self.num_windows / self.world_size

    @property
    def batches_per_epoch(self) -> float:
        """Batches this rank draws per pass over the data (fractional: batches straddle epochs)."""
        return self.windows_per_rank / self.batch_size

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands in the global stream; identical on every rank, so rank 0's copy resumes them
        all, at this world size or another."""
        return {**self.order.state_dict(), "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a saved loader stopped. The batch size and world size may change: the stream's
        position is counted in windows (a resumed run sees the same data when the global batch is unchanged)."""
        for key in ("seed", "seq_len", "num_windows"):
            if state.get(key) != getattr(self, key):
                raise UserError(f"cannot resume the data loader: it was saved with {key}={state.get(key)}, "
                                f"now {key}={getattr(self, key)}; resume with the same data and settings")
        self.order.load_state_dict(state)


def eval_batches(shards: TokenShards, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> Iterator[Batch]:
    """The split as (x, y) batches for perplexity, in stream order; the last batch may be smaller.

    The split is cut into windows of seq_len targets (overlapping by one token, so every token but the
    first is a target exactly once). All of them by default; with `max_batches`, a fixed sample of
    max_batches * batch_size windows spread evenly over the whole split, the same at every call."""
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
    count = (len(shards) - 1) // seq_len
    if count == 0:
        raise UserError(f"sequence length {seq_len} is too long for {shards.dir} ({shards.split}: "
                        f"{len(shards):,} tokens); lower the sequence length or prepare more data")
    windows = range(count)
    if max_batches is not None and max_batches * batch_size < count:
        # Window i * count // n for i < n: evenly spaced from the split's start to its end, so a sample
        # sees every part of the split (its files are in name order) rather than only the first ones.
        n = max(max_batches, 0) * batch_size
        windows = [i * count // n for i in range(n)]
    for first in range(0, len(windows), batch_size):
        rows = np.stack([shards.read(i * seq_len, seq_len + 1) for i in windows[first:first + batch_size]])
        tokens = torch.from_numpy(rows)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


__all__ = ["BatchLoader", "eval_batches"]
