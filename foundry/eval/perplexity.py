"""Validation loss and perplexity, and the unigram baseline they must beat."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import numpy as np
import torch
import torch.nn.functional as F

from foundry.data import cache
from foundry.data.loader import eval_batches
from foundry.data.shards import TokenShards

BASELINE = "unigram_baseline"  # cache name, in the training split's data directory


@dataclass
class Perplexity:
    """Mean cross-entropy (nats per token) over `tokens` tokens, and its exponential."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards: TokenShards, batch_size: int, seq_len: int,
             max_batches: int | None = None, device: torch.device | str = "cpu",
             autocast: ContextManager | None = None) -> Perplexity:
    """Next-token cross-entropy of `model` over `shards`: the whole split, or with `max_batches` a fixed
    sample of max_batches * batch_size windows spread evenly over it (see eval_batches), so every call
    with the same arguments scores the same tokens and evaluations of a run compare like with like."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(shards, batch_size, seq_len, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("no validation batches: the validation split is shorter than one sequence")
    return Perplexity(total / count, count)


def unigram_baseline(train: TokenShards, val: TokenShards, vocab_size: int) -> Perplexity:
    """Cross-entropy of the validation tokens under the training set's token frequencies (add-one).

    Counted once per data directory: the result is cached beside the shards, keyed by the vocabulary
    size and every shard file's size and times, so a restart on a large corpus does not recount it."""
    key = {"vocab_size": vocab_size, "train": train.file_keys, "val": val.file_keys}
    cached = cache.read(train.dir, BASELINE)
    if cached.get("key") == key:
        return Perplexity(float(cached["loss"]), int(cached["tokens"]))
    counts = np.ones(vocab_size, dtype=np.float64)
    for shard in train.arrays():
        counts += np.bincount(shard, minlength=vocab_size)[:vocab_size]
    log_probs = np.log(counts / counts.sum())
    val_counts = np.zeros(vocab_size, dtype=np.float64)
    for shard in val.arrays():
        val_counts += np.bincount(shard, minlength=vocab_size)[:vocab_size]
    tokens = int(val_counts.sum())
    result = Perplexity(float(-(val_counts * log_probs).sum() / max(tokens, 1)), tokens)
    cache.write(train.dir, BASELINE, {"key": key, "loss": result.loss, "tokens": result.tokens})
    return result
