"""Preference pairs (DPO): a prompt with a chosen and a rejected reply, encoded with labels on the reply only.

A record is `{"prompt": str, "chosen": str, "rejected": str}` (the prompt a user turn, each reply an
assistant turn) or `{"chosen": [messages], "rejected": [messages]}`: two conversations that agree up to
their last message, an assistant turn that differs (a "prompt" key beside them, as in UltraFeedback, is
ignored). Only the final reply and its end-of-turn token are trained, never earlier assistant turns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from foundry.core.errors import UserError
from foundry.data.instructions import IGNORE, Example, assistant_spans, check_messages, labels_for
from foundry.data.jsonl import Record, read_jsonl
from foundry.data.packing import EpochOrder, check_resume, fit_examples, rows_digest, shifted_targets
from foundry.tokenizer import Tokenizer

PairBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Pair:
    """One encoded preference pair."""

    chosen: Example
    rejected: Example


@dataclass
class Pairs:
    """The pairs of a JSONL file, and the bad lines skipped (as `path:line: why`)."""

    pairs: list[Pair]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)


def record_conversations(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The chosen and rejected conversations of a DPO record (either form), checked."""
    if "chosen" not in data or "rejected" not in data:
        raise UserError("expected {\"prompt\", \"chosen\", \"rejected\"} or {\"chosen\": [messages], "
                        f"\"rejected\": [messages]}}, got keys {sorted(data)}")
    chosen, rejected = data["chosen"], data["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            raise UserError(f"\"prompt\" must be a string beside string replies, got {type(prompt).__name__}")
        user = {"role": "user", "content": prompt}
        chosen = [user, {"role": "assistant", "content": chosen}]
        rejected = [user, {"role": "assistant", "content": rejected}]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        check_messages(chosen, "chosen")
        check_messages(rejected, "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise UserError("\"chosen\" and \"rejected\" must be the same conversation up to their last message")
        for name, conversation in (("chosen", chosen), ("rejected", rejected)):
            if conversation[-1]["role"] != "assistant":
                raise UserError(f"the last message of \"{name}\" must be the assistant reply, "
                                f"not a {conversation[-1]['role']!r} turn")
    else:
        raise UserError("\"chosen\" and \"rejected\" must both be strings (with a \"prompt\") or both lists of "
                        f"messages, got {type(chosen).__name__} and {type(rejected).__name__}")
    if chosen[-1] == rejected[-1]:
        raise UserError("the chosen and rejected replies are the same, so the pair teaches nothing; drop the line")
    if len(chosen) < 2:
        raise UserError("a pair needs a prompt before the reply")
    return chosen, rejected


def check_pair_record(record: Record) -> None:
    """read_jsonl's `check` for DPO records: the record's form and types (UserError names file:line)."""
    try:
        record_conversations(record.data)
    except UserError as exc:
        raise UserError(f"{record.where}: {exc}") from None


def encode_pair(tokenizer: Tokenizer, chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> Pair:
    """Both conversations encoded, each trained on its final reply (and end-of-turn token) only."""
    return Pair(_encode_reply(tokenizer, chosen), _encode_reply(tokenizer, rejected))


def _encode_reply(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> Example:
    ids, spans = assistant_spans(tokenizer, messages)
    return Example(ids, labels_for(ids, spans[-1:]))


def load_pairs(path: str | Path, tokenizer: Tokenizer, skip_bad_lines: bool = False) -> Pairs:
    """Read and encode a DPO JSONL file; a line that cannot be encoded is a bad line like a malformed one."""
    encoded: dict[int, Pair] = {}

    def check(record: Record) -> None:
        try:
            encoded[record.line] = encode_pair(tokenizer, *record_conversations(record.data))
        except UserError as exc:
            raise UserError(f"{record.where}: {exc}") from None

    records = read_jsonl(path, skip_bad_lines, check)
    return Pairs([encoded[r.line] for r in records], list(records.skipped))


def pairs_batch(pairs: Sequence[Pair], seq_len: int, pad_id: int) -> PairBatch:
    """(chosen_ids, chosen_targets, rejected_ids, rejected_targets) [len(pairs), seq_len], right-padded."""
    b, t = len(pairs), seq_len
    out = [np.full((b, t), fill, dtype=np.int64) for fill in (pad_id, IGNORE, pad_id, IGNORE)]
    for i, pair in enumerate(pairs):
        for k, example in enumerate((pair.chosen, pair.rejected)):
            n = len(example.ids)
            labels = np.asarray(example.labels, dtype=np.int64)
            out[2 * k][i, :n] = example.ids
            out[2 * k + 1][i, :n] = shifted_targets(labels, np.zeros(n, dtype=np.int64))
    return tuple(torch.from_numpy(a) for a in out)


class PairLoader:
    """Infinite (chosen_ids, chosen_targets, rejected_ids, rejected_targets) batches [batch_size, seq_len].

    Each sequence is right-padded with pad_id (padding comes after every real token, so plain causal attention
    never sees it) and cut to its first seq_len tokens; targets are the labels shifted by one, IGNORE on the
    prompt and padding. A pair left with nothing to train on either side once cut is dropped (`dropped`).
    Pairs are visited in an order shuffled by (seed, epoch), rank-disjoint; state_dict resumes exactly."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
        self.batch_size, self.seq_len, self.seed, self.world_size, self.pad_id = (
            batch_size, seq_len, seed, world_size, pad_id)
        self.pairs: list[Pair] = []
        self.truncated = self.dropped = 0
        for pair in pairs:
            fitted, truncated, dropped = fit_examples([pair.chosen, pair.rejected], seq_len)
            self.truncated += truncated > 0
            if dropped:
                self.dropped += 1
            else:
                self.pairs.append(Pair(*fitted))
        if not self.pairs:
            raise UserError(f"none of the {len(pairs)} preference pairs keeps a trained reply token within the "
                            f"first {seq_len} tokens; raise the sequence length")
        self.order = EpochOrder(len(self.pairs), seed, rank, world_size, "pairs")
        self.digest = rows_digest([np.asarray(e.labels) for p in self.pairs for e in (p.chosen, p.rejected)]
                                  + [np.asarray(e.ids) for p in self.pairs for e in (p.chosen, p.rejected)])

    def __iter__(self) -> "PairLoader":
        return self

    def __next__(self) -> PairBatch:
        return pairs_batch([self.pairs[i] for i in self.order.take(self.batch_size)], self.seq_len, self.pad_id)

    def held_out_batches(self) -> list[PairBatch]:
        """Every pair exactly once, in order, in batches of batch_size (for validation)."""
        return [pairs_batch(self.pairs[i:i + self.batch_size], self.seq_len, self.pad_id)
                for i in range(0, len(self.pairs), self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands; identical on every rank, so rank 0's copy resumes them all."""
        return {**self.order.state_dict(), **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a saved loader stopped (the batch size may change; pairs are counted)."""
        check_resume(state, self._identity(), "preference data")
        self.order.load_state_dict(state)

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "seq_len": self.seq_len,
                "num_pairs": len(self.pairs), "pairs_sha256": self.digest}


__all__ = ["Pair", "Pairs", "record_conversations", "check_pair_record", "encode_pair", "load_pairs", "pairs_batch", "PairLoader"]
