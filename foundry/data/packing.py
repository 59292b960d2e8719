"""Packing short SFT examples into rows, and the seeded, resumable loader of instruction batches.

A packed row holds several examples back to back; `segments` says which example each token belongs to and
`positions` restart at 0 for each, so the model (Transformer(..., segments=...)) computes every example
exactly as it would alone, and no target crosses from one example into the next.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from foundry.core.errors import UserError
from foundry.data.instructions import IGNORE, Example
from foundry.data.order import EpochOrder

PAD_SEGMENT = -1  # the segment of padding: no real token attends to it, nor it to one

InstructionBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Row:
    """One row of at most seq_len tokens: one or more examples back to back (unpadded)."""

    ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n], IGNORE where not trained
    positions: np.ndarray  # int64 [n], 0 at the start of each example
    segments: np.ndarray  # int64 [n], 0, 1, ... the example within the row


@dataclass
class Packed:
    """Rows made from examples, and what fitting them to seq_len cost."""

    rows: list[Row]
    truncated: int = 0  # examples longer than seq_len, cut to their first seq_len tokens
    dropped: int = 0  # examples left with nothing to train once cut (not in any row)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]


def fit_examples(examples: Sequence[Example], seq_len: int) -> tuple[list[Example], int, int]:
    """Examples cut to seq_len tokens, with the count cut and the count dropped for training nothing then."""
    if seq_len < 2:
        raise UserError(f"sequence length must be at least 2 for instruction data, got {seq_len}")
    out, truncated, dropped = [], 0, 0
    for example in examples:
        if len(example.ids) > seq_len:
            truncated += 1
            example = Example(example.ids[:seq_len], example.labels[:seq_len])
        # The first token of an example is never a target (nothing comes before it in its segment).
        if all(label == IGNORE for label in example.labels[1:]):
            dropped += 1
            continue
        out.append(example)
    return out, truncated, dropped


def pack(examples: Sequence[Example], seq_len: int, seed: int) -> Packed:
    """Best-fit-decreasing packing of examples into rows of at most seq_len tokens (longer ones truncated).

    The seed shuffles the examples before the stable sort by length, so ties are placed at random yet
    reproducibly; each example goes to the fullest row it still fits in, or opens a new one."""
    fitted, truncated, dropped = fit_examples(examples, seq_len)
    order = list(range(len(fitted)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(fitted[i].ids))
    members: list[list[int]] = []
    # (space left, row index), kept sorted: bisect finds the row with the least room that still fits.
    space: list[tuple[int, int]] = []
    for i in order:
        need = len(fitted[i].ids)
        at = bisect.bisect_left(space, (need, -1))
        if at == len(space):
            row, left = len(members), seq_len
            members.append([])
        else:
            left, row = space.pop(at)
        members[row].append(i)
        if left - need > 0:
            bisect.insort(space, (left - need, row))
    return Packed([_row(fitted, m) for m in members], truncated, dropped)


def one_per_row(examples: Sequence[Example], seq_len: int) -> Packed:
    """Each example alone in its row (truncated to seq_len): the layout without packing."""
    fitted, truncated, dropped = fit_examples(examples, seq_len)
    return Packed([_row(fitted, [i]) for i in range(len(fitted))], truncated, dropped)


def _row(examples: list[Example], members: list[int]) -> Row:
    parts = [examples[i] for i in members]
    return Row(ids=np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in parts]),
               labels=np.concatenate([np.asarray(e.labels, dtype=np.int64) for e in parts]),
               positions=np.concatenate([np.arange(len(e.ids), dtype=np.int64) for e in parts]),
               segments=np.concatenate([np.full(len(e.ids), k, dtype=np.int64) for k, e in enumerate(parts)]))


def shifted_targets(labels: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """targets[t] = labels[t + 1] within a segment; IGNORE at each segment's last token (and padding's)."""
    targets = np.full_like(labels, IGNORE)
    same = (segments[:-1] == segments[1:]) & (segments[:-1] != PAD_SEGMENT)
    targets[:-1] = np.where(same, labels[1:], IGNORE)
    return targets


def check_resume(state: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    """Refuse to resume a loader saved with other data or settings (UserError names the first difference)."""
    for key, value in expected.items():
        if state.get(key) != value:
            raise UserError(f"cannot resume the {what} loader: it was saved with {key}={state.get(key)}, "
                            f"now {key}={value}; resume with the same data and settings")


def rows_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 over the arrays' shapes and contents: equal digests mean the same rows in the same order."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def rows_batch(rows: Sequence[Row], seq_len: int, pad_id: int) -> InstructionBatch:
    """(input_ids, targets, positions, segments) [len(rows), seq_len]: the rows right-padded, targets shifted."""
    b, t = len(rows), seq_len
    ids = np.full((b, t), pad_id, dtype=np.int64)
    targets = np.full((b, t), IGNORE, dtype=np.int64)
    positions = np.zeros((b, t), dtype=np.int64)
    segments = np.full((b, t), PAD_SEGMENT, dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row.ids)
        ids[i, :n], positions[i, :n], segments[i, :n] = row.ids, row.positions, row.segments
        targets[i, :n] = shifted_targets(row.labels, row.segments)
    return tuple(torch.from_numpy(a) for a in (ids, targets, positions, segments))


def held_out_batches(examples: Sequence[Example], batch_size: int, seq_len: int, packing: bool = True,
                     pad_id: int = 0) -> list[InstructionBatch]:
    """Every held-out example exactly once, in batches laid out as the training loader's (for validation)."""
    packed = pack(examples, seq_len, 0) if packing else one_per_row(examples, seq_len)
    return [rows_batch(packed.rows[i:i + batch_size], seq_len, pad_id) for i in range(0, len(packed.rows), batch_size)]


class InstructionLoader:
    """Infinite (input_ids, targets, positions, segments) batches [batch_size, seq_len] of int64.

    packing=True packs examples into rows (see `pack`); False puts one example in each row. Rows are
    right-padded with pad_id, position 0 and segment PAD_SEGMENT; targets are the labels shifted by one
    within each example, IGNORE on prompts, at each example's last token and on padding. Rows are visited
    in an order shuffled by (seed, epoch), rank-disjoint; a batch may straddle two epochs; state_dict /
    load_state_dict resume exactly. `packed` tells how many examples were truncated or dropped."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, seed: int,
                 packing: bool = True, rank: int = 0, world_size: int = 1, pad_id: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
        if not examples:
            raise UserError("no instruction examples to train on")
        self.batch_size, self.seq_len, self.seed, self.packing, self.pad_id = batch_size, seq_len, seed, packing, pad_id
        self.packed = pack(examples, seq_len, seed) if packing else one_per_row(examples, seq_len)
        if not self.packed.rows:
            raise UserError(f"none of the {len(examples)} examples has a trained token within the first {seq_len} "
                            "tokens; raise the sequence length")
        self.order = EpochOrder(len(self.packed.rows), seed, rank, world_size)
        self.world_size = world_size
        self.digest = rows_digest([a for r in self.packed.rows for a in (r.ids, r.labels, r.segments)])

    def __iter__(self) -> "InstructionLoader":
        return self

    def __next__(self) -> InstructionBatch:
        return rows_batch([self.packed.rows[i] for i in self.order.take(self.batch_size)], self.seq_len, self.pad_id)

    @property
    def batches_per_epoch(self) -> float:
        """Batches this rank draws per pass over its rows (fractional: batches straddle epochs)."""
        return self.order.per_rank / self.batch_size

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands; identical on every rank, so rank 0's copy resumes them all."""
        return {**self.order.state_dict(), **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a saved loader stopped (the batch size may change; rows are counted)."""
        check_resume(state, self._identity(), "instruction data")
        self.order.load_state_dict(state)

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "seq_len": self.seq_len, "packing": self.packing,
                "num_rows": len(self.packed.rows), "rows_sha256": self.digest}


__all__ = ["PAD_SEGMENT", "Row", "Packed", "fit_examples", "pack", "one_per_row", "shifted_targets", "EpochOrder",
           "check_resume", "rows_digest", "rows_batch", "held_out_batches", "InstructionLoader"]
