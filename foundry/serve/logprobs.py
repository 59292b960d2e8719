"""Token log-probabilities in OpenAI's shapes: chat's `logprobs.content` and completions' four parallel lists."""

from __future__ import annotations

from typing import Any

from foundry.infer.constrained import ll_tokenizer
from foundry.infer.scheduler import TokenLogprob


class TokenText:
    """Each token id's bytes and display text (OpenAI writes a token that is not whole UTF-8 as "bytes:\\x..")."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token."""
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._look_up(token_id)
        return hit

    def _look_up(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            return f"token_id:{token_id}", []
        if token_id >= self.tokenizer.vocab_size:
            return "", []  # an embedding row past the tokenizer (padding): it has no text
        ll = ll_tokenizer(self.tokenizer)  # a byte-level view: one token may be part of a character
        if token_id < ll.vocab_size and not ll.is_special_token(token_id):
            raw = ll.decode_bytes([token_id])
        else:
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)


def chat_entries(logprobs: list[TokenLogprob], text: TokenText) -> list[dict[str, Any]]:
    """Chat's logprobs.content items: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
    entries = []
    for lp in logprobs:
        token, raw = text(lp.token_id)
        top = []
        for token_id, value in lp.top:
            alt, alt_raw = text(token_id)
            top.append({"token": alt, "logprob": value, "bytes": alt_raw})
        entries.append({"token": token, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return entries


def completion_logprobs(logprobs: list[TokenLogprob], text: TokenText, so_far: bytearray) -> dict[str, Any]:
    """Completions' {tokens, token_logprobs, top_logprobs (token -> logprob), text_offset}.

    `so_far` holds the bytes of the choice's earlier tokens (extended here): a token's text_offset is the
    number of whole characters before it, so a character split over two tokens is counted once."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in logprobs:
        token, raw = text(lp.token_id)
        out["tokens"].append(token)
        out["token_logprobs"].append(lp.logprob)
        # A prompt's first token has no probability and no alternatives: null for both, as OpenAI writes it.
        out["top_logprobs"].append({text(t)[0]: v for t, v in lp.top} if lp.logprob is not None else None)
        out["text_offset"].append(len(so_far.decode("utf-8", "ignore")))
        so_far.extend(raw)
    return out
