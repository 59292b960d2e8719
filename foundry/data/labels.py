"""Labelled examples for sequence classification: JSONL records of `{"text": ..., "label": ...}` (or
`{"messages": [...], "label": ...}`, rendered with the chat template), their token ids, and seeded,
resumable, right-padded batches.

Texts longer than the context keep their END (after a leading bos, where the tokenizer adds one): the
classifier pools the last token, so the end is what it reads most directly, and for conversations the
last turn is usually what is being classified."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from foundry.core.errors import UserError
from foundry.data.jsonl import JsonlRecords, Record, read_jsonl
from foundry.data.order import EpochOrder

Example = str | list[dict[str, Any]]  # a text, or a conversation for the chat template


def _label_of(record: Record) -> str:
    label = record.data["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise UserError(f"{record.where}: \"label\" must be a string or an integer, got {type(label).__name__}")
    return str(label)


def check_labelled(record: Record) -> None:
    """Raise UserError (naming file:line) for a record that is not a labelled text or conversation."""
    data = record.data
    if "label" not in data:
        raise UserError(f"{record.where}: missing \"label\" (each line needs \"text\" and \"label\")")
    _label_of(record)
    if "text" in data:
        if not isinstance(data["text"], str):
            raise UserError(f"{record.where}: \"text\" must be a string, got {type(data['text']).__name__}")
        if not data["text"].strip():
            raise UserError(f"{record.where}: \"text\" is empty")
        return
    messages = data.get("messages")
    if messages is None:
        raise UserError(f"{record.where}: missing \"text\" (each line needs \"text\" and \"label\")")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise UserError(f"{record.where}: \"messages\" must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects with string values")


@dataclass
class LabelledExamples:
    """Texts (or conversations) with their label strings, and the sorted label set they use."""

    examples: list[Example]
    labels: list[str]
    skipped: list[str]  # bad lines skipped, as "path:line: why"
    source: str = ""

    @classmethod
    def from_records(cls, records: JsonlRecords, source: str = "") -> LabelledExamples:
        """Examples from records already checked with check_labelled."""
        examples: list[Example] = []
        labels: list[str] = []
        for record in records:
            text = record.data.get("text")
            examples.append(text if isinstance(text, str) else list(record.data["messages"]))
            labels.append(_label_of(record))
        return cls(examples, labels, list(records.skipped), source)

    @property
    def texts(self) -> list[Example]:
        return self.examples

    @property
    def label_set(self) -> list[str]:
        """The distinct labels, sorted: output i of a classifier trained on these examples is label_set[i]."""
        return sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.examples)

    def encode(self, tokenizer: Any, max_len: int) -> list[list[int]]:
        """Token ids of every example, at most max_len each (longer ones keep a leading bos and their end).

        Text is encoded as transformers' tokenizer(text) does (special tokens added, e.g. Llama's bos) but
        with special-token text read as plain text, so a text cannot forge a pad or eos."""
        if max_len < 2:
            raise UserError(f"the maximum sequence length must be at least 2, got {max_len}")
        out = []
        for example in self.examples:
            if isinstance(example, str):
                ids = tokenizer.encode(example, add_special_tokens=True, split_special_tokens=True)
            else:
                ids = tokenizer.encode_chat(example)
            out.append(truncate_keeping_end(ids, max_len, tokenizer.bos_id))
        return out

    def label_ids(self, label_set: Sequence[str] | None = None) -> list[int]:
        """The label of every example as an index into label_set (default: this set's own).

        Raises UserError naming labels the set lacks (at evaluation: labels unseen at training)."""
        label_set = list(self.label_set if label_set is None else label_set)
        index = {label: i for i, label in enumerate(label_set)}
        unseen = sorted(set(self.labels) - index.keys())
        if unseen:
            where = f"{self.source}: " if self.source else ""
            raise UserError(f"{where}label(s) {', '.join(map(repr, unseen))} were not seen in training; the model "
                            f"knows {', '.join(map(repr, label_set))}: fix the data or retrain with them")
        return [index[label] for label in self.labels]


def truncate_keeping_end(ids: list[int], max_len: int, bos_id: int | None = None) -> list[int]:
    """ids cut to max_len from the left, keeping a leading bos_id."""
    if len(ids) <= max_len:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return [ids[0], *ids[len(ids) - max_len + 1:]]
    return ids[len(ids) - max_len:]


def read_labelled(path: str | Path, skip_bad_lines: bool = False) -> LabelledExamples:
    """Labelled examples from a JSONL file; a record without text/messages or label is a bad line."""
    return LabelledExamples.from_records(read_jsonl(path, skip_bad_lines, check_labelled), str(path))


def class_weights(label_ids: Sequence[int], num_labels: int) -> torch.Tensor:
    """Inverse-frequency class weights [num_labels], scaled so that their mean over the examples is 1.

    A class absent from the data gets weight 0 (it has no examples to weight)."""
    counts = torch.bincount(torch.as_tensor(list(label_ids), dtype=torch.long), minlength=num_labels).double()
    weights = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    # sum_i w[y_i] = number of classes present; scale it to the number of examples.
    weights = weights * (len(label_ids) / max(int((counts > 0).sum()), 1))
    return weights.float()


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], pad_mask [B, T] True for real tokens) of token rows right-padded to the longest."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pad_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        pad_mask[i, :len(row)] = True
    return input_ids, pad_mask


ClassifierBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ClassifierBatches:
    """Infinite (input_ids [B, T], pad_mask [B, T], labels [B]) batches, right-padded to each batch's longest.

    Each epoch visits the examples in an order shuffled by (seed, epoch); a batch may straddle two epochs.
    state_dict()/load_state_dict() resume exactly where a run stopped."""

    def __init__(self, token_ids: Sequence[Sequence[int]], label_ids: Sequence[int], batch_size: int,
                 pad_id: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        if not token_ids:
            raise UserError("no labelled examples to train on")
        if len(token_ids) != len(label_ids):
            raise ValueError(f"{len(token_ids)} token rows but {len(label_ids)} labels")
        if any(len(row) == 0 for row in token_ids):
            raise UserError("a labelled example encodes to no tokens; remove empty texts")
        self.token_ids, self.label_ids = list(token_ids), list(label_ids)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.order = EpochOrder(len(self.token_ids), seed, rank, world_size, "examples", salt="labelled")

    def __iter__(self) -> ClassifierBatches:
        return self

    def __next__(self) -> ClassifierBatch:
        chosen = self.order.take(self.batch_size)
        input_ids, pad_mask = pad_batch([self.token_ids[i] for i in chosen], self.pad_id)
        return input_ids, pad_mask, torch.tensor([self.label_ids[i] for i in chosen], dtype=torch.long)

    @property
    def batches_per_epoch(self) -> float:
        return self.order.per_rank / self.batch_size

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands."""
        return {**self.order.state_dict(), "seed": self.seed,
                "num_examples": len(self.token_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a saved loader stopped (the batch size may change; examples are counted)."""
        for key, now in (("seed", self.seed), ("num_examples", len(self.token_ids))):
            if state.get(key) != now:
                raise UserError(f"cannot resume the data loader: it was saved with {key}={state.get(key)}, "
                                f"now {key}={now}; resume with the same data and settings")
        self.order.load_state_dict(state)


def batches(token_ids: Sequence[Sequence[int]], label_ids: Sequence[int], batch_size: int, pad_id: int,
            seed: int, rank: int = 0, world_size: int = 1) -> ClassifierBatches:
    """Seeded, resumable training batches, rank-disjoint (see ClassifierBatches)."""
    return ClassifierBatches(token_ids, label_ids, batch_size, pad_id, seed, rank, world_size)


def eval_batches(token_ids: Sequence[Sequence[int]], label_ids: Sequence[int], batch_size: int,
                 pad_id: int) -> Iterator[ClassifierBatch]:
    """Every example once, in order, as right-padded batches (the last may be smaller)."""
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    for first in range(0, len(token_ids), batch_size):
        rows = token_ids[first:first + batch_size]
        input_ids, pad_mask = pad_batch(rows, pad_id)
        yield input_ids, pad_mask, torch.tensor(list(label_ids[first:first + batch_size]), dtype=torch.long)


__all__ = [
    "ClassifierBatches",
    "LabelledExamples",
    "batches",
    "check_labelled",
    "class_weights",
    "eval_batches",
    "pad_batch",
    "read_labelled",
    "truncate_keeping_end",
]
