"""Validation loss and perplexity, and the unigram baseline they must beat."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import numpy as np
import torch
import torch.nn.functional as F

from foundry.data.loader import eval_batches
from foundry.data.shards import TokenShards


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
    """Next-token cross-entropy of `model` over the first `max_batches` batches of `shards`."""
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
    """Cross-entropy of the validation tokens under the training set's token frequencies (add-one)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for shard in train.arrays():
        counts += np.bincount(shard, minlength=vocab_size)[:vocab_size]
    log_probs = np.log(counts / counts.sum())
    val_counts = np.zeros(vocab_size, dtype=np.float64)
    for shard in val.arrays():
        val_counts += np.bincount(shard, minlength=vocab_size)[:vocab_size]
    tokens = int(val_counts.sum())
    return Perplexity(float(-(val_counts * log_probs).sum() / max(tokens, 1)), tokens)
