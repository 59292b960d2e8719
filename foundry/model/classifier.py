"""Sequence classification on a decoder: a linear score head over the hidden state of each row's last real
token, as Hugging Face's `<Family>ForSequenceClassification` computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foundry.model.transformer import Transformer


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None,
                     pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the position whose hidden state is pooled: the rightmost token that is not pad_token_id.

    This is transformers' rule (GenericForSequenceClassification), so both pick the same token on the same ids
    whatever the padding side; a row of nothing but padding pools position 0 there too. Without a pad id the
    rightmost True of pad_mask is used, else the last position."""
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device)
    if pad_token_id is not None:
        real = input_ids != pad_token_id
    elif pad_mask is not None:
        real = pad_mask.bool()
    else:
        return torch.full((b,), t - 1, dtype=torch.long, device=input_ids.device)
    return (positions * real).argmax(dim=-1)


class SequenceClassifier(nn.Module):
    """A decoder transformer with a `score` head: token ids [B, T] in, class logits [B, num_labels] out.

    Parameter names are the Hugging Face classifier's once the `transformer.` prefix is dropped
    (`model.*` and `score.weight`). The transformer's output head is replaced by an identity: a classifier
    never computes vocabulary logits, and an untied head would be the largest matrix in memory."""

    def __init__(self, transformer: Transformer, num_labels: int, pad_token_id: int | None):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {num_labels}")
        transformer.lm_head = nn.Identity()
        self.transformer = transformer
        self.config = transformer.config
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        hidden = transformer.config.hidden_size
        weight = transformer.model.embed_tokens.weight
        self.score = nn.Linear(hidden, num_labels, bias=False, device=weight.device, dtype=weight.dtype)

    @torch.no_grad()
    def init_score(self, seed: int | None = None, std: float = 0.02) -> None:
        """A fresh score head, N(0, std)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.score.weight.copy_(torch.randn(self.score.weight.shape, generator=gen) * std)

    def forward(self, input_ids: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, num_labels] for right-padded token ids [B, T] (pad_mask: True for real tokens)."""
        # Under right padding causal attention already keeps the pads out of every real token's view, so the
        # mask is dropped for the faster plain causal path; other padding keeps it (positions stay 0..T-1,
        # as transformers counts them without position_ids).
        if pad_mask is not None and bool((pad_mask[:, 1:] <= pad_mask[:, :-1]).all()):
            pad_mask_for_attention = None
        else:
            pad_mask_for_attention = pad_mask
        hidden = self.transformer.hidden_states(input_ids, pad_mask=pad_mask_for_attention)
        index = last_token_index(input_ids, self.pad_token_id, pad_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        return self.score(pooled)

    def loss(self, input_ids: torch.Tensor, pad_mask: torch.Tensor | None, labels: torch.Tensor,
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of the labels [B]; class_weights [num_labels] weight each row by its true class."""
        logits = self(input_ids, pad_mask).float()
        weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
        return F.cross_entropy(logits, labels.to(logits.device), weight=weight)


__all__ = ["SequenceClassifier", "last_token_index"]
