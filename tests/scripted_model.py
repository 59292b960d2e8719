"""A stand-in for Transformer whose output a test chooses: the next token is a fixed function of the last one."""

from __future__ import annotations

import torch
from torch import nn

from foundry.config import ModelConfig
from foundry.tokenizer import Tokenizer


class BigramModel(nn.Module):
    """Greedy decoding follows `table` (token -> next token) exactly; any token not in it is followed by `default`.

    It has the two methods the engine calls (hidden_states, logits) and a config for its KV cache."""

    def __init__(self, vocab_size: int, table: dict[int, int], default: int = 0, context: int = 64):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                  num_key_value_heads=1, intermediate_size=8, max_position_embeddings=context)
        scores = torch.full((vocab_size, vocab_size), -10.0)
        scores[:, default] = 10.0
        for token, after in table.items():
            scores[token] = -10.0
            scores[token, after] = 10.0
        self.scores = nn.Parameter(scores, requires_grad=False)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                      pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None:  # keep the cache's bookkeeping as the real model does
            cache.reserve(input_ids.shape[1], pad_mask)
            cache.advance(input_ids.shape[1])
        return nn.functional.one_hot(input_ids, self.config.vocab_size).to(self.scores.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.scores


def ascii_tokenizer() -> Tokenizer:
    """A byte-level BPE that never saw non-ascii text, so an emoji encodes as its four byte tokens."""
    return Tokenizer.train(["hello world, plain ascii text only. " * 50], vocab_size=300)


def chain(tokenizer: Tokenizer, prompt: str, text: str) -> dict[int, int]:
    """The bigram table after which greedy decoding of `prompt` writes `text`'s tokens, then eos.

    Every token of prompt[-1:] + text must be distinct, so that the chain is a function."""
    ids = tokenizer.encode(prompt)[-1:] + tokenizer.encode(text) + [tokenizer.eos_id]
    assert len(set(ids)) == len(ids), f"{prompt!r} + {text!r} repeats a token"
    return dict(zip(ids, ids[1:]))
