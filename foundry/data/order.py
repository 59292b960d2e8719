"""The order a run visits its training items in: seeded per epoch, shared out over data-parallel ranks."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from foundry.core.errors import UserError


def epoch_seed(seed: int, epoch: int, salt: str = "") -> int:
    """A permutation seed for (seed, epoch): hashed, so that neighbouring seeds or epochs give unrelated orders."""
    key = f"{salt}/{seed}/{epoch}" if salt else f"{seed}/{epoch}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


class EpochOrder:
    """Which item comes next, for every rank of a data-parallel run.

    Each epoch visits the items in a permutation seeded by (seed, epoch); the epochs one after the other make a
    global stream, and rank r of world_size takes its items r, r + world_size, ...: ranks never share an item
    within an epoch, all advance in lockstep, and one draw over all ranks is the stream's next world_size items
    whatever the world size, so a run resumes at another world size (same global batch) on the same items."""

    def __init__(self, count: int, seed: int, rank: int = 0, world_size: int = 1, what: str = "rows", salt: str = ""):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if count < world_size:
            raise UserError(f"{count} training {what} cannot feed {world_size} ranks; give more data")
        self.count, self.seed, self.rank, self.world_size, self.salt = count, seed, rank, world_size, salt
        self.epoch = 0
        self.position = 0  # items of the current epoch's permutation that all ranks together have taken
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    def _item(self, epoch: int, index: int) -> int:
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.salt))
            self._order = torch.randperm(self.count, generator=generator)
            self._order_epoch = epoch
        return int(self._order[index])

    def take(self, n: int) -> list[int]:
        """This rank's next n item indices (crossing into the next epoch when this one runs out)."""
        out = []
        for _ in range(n):
            epoch, index = self.epoch, self.position + self.rank
            if index >= self.count:  # this rank's item of the draw opens the next epoch
                epoch, index = epoch + 1, index - self.count
            out.append(self._item(epoch, index))
            self.position += self.world_size
            if self.position >= self.count:
                self.epoch, self.position = self.epoch + 1, self.position - self.count
        return out

    @property
    def per_rank(self) -> float:
        """Items each rank takes per epoch (fractional when world_size does not divide the count)."""
        return self.count / self.world_size

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands (identical on every rank, valid at any world size)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state_dict."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
