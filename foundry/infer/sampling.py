"""Per-request sampling settings and the next-token sampler (temperature, top-k, top-p, penalties, logit bias)."""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from foundry.core.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 256
# When neither the user nor generation_config.json says otherwise we sample at temperature 1 with no
# truncation, as OpenAI-style servers do; generation_config's `do_sample: false` means greedy.
_BUILTIN = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0}
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass
class SamplingParams:
    """How one request picks tokens and when it stops. Fields left None take the model's defaults.

    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off; repetition_penalty 1 is off.
    presence_penalty / frequency_penalty (OpenAI's, in [-2, 2], 0 is off) are subtracted from the logits of
    tokens already generated, once / per occurrence; logit_bias adds to given token ids' logits.
    logprobs: None is off; k >= 0 reports each sampled token's log-probability and the k most likely.
    prompt_logprobs: the same for the prompt's tokens (each under the tokens before it; the first has none).
    A constraint object is used by one request only: it keeps that request's state."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Constrained decoding: an object with mask(vocab_size) -> bool tensor [V] (True = allowed) or None,
    # advance(token_id) after every sampled token, and is_finished() (then the request stops, reason "stop").
    constraint: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        bias = self.logit_bias or {}
        if not isinstance(bias, dict):
            raise UserError(f"logit_bias must map token ids to numbers, got {bias!r}")
        # JSON object keys are strings: accept "42" for 42.
        self.logit_bias = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in bias.items()}
        self.validate()

    def validate(self) -> None:
        """Raise UserError naming the first out-of-range setting."""
        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is not None and not (_is_number(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise UserError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if self.repetition_penalty is not None and not (
                _is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserError(f"repetition_penalty must be a number > 0 (1 turns it off), got {self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise UserError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise UserError(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise UserError(f"stop_token_ids must be integers >= 0, got {t!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and -2 <= value <= 2):
                raise UserError(f"{name} must be a number in [-2, 2] (0 turns it off), got {value!r}")
        for t, b in self.logit_bias.items():
            if not _is_int(t) or t < 0:
                raise UserError(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
            if not (_is_number(b) and -100 <= b <= 100):
                raise UserError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise UserError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (top tokens to report), "
                                f"got {value!r}")

    def resolve(self, generation_config: dict[str, Any] | None = None) -> "SamplingParams":
        """A copy with every unset field filled from generation_config.json, then from built-in defaults."""
        gen = generation_config or {}
        filled: dict[str, Any] = {}
        for name, default in _BUILTIN.items():
            value = getattr(self, name)
            if value is None:
                value = gen.get(name)
                value = default if value is None else value
            filled[name] = value
        if self.temperature is None and gen.get("do_sample") is False:
            filled["temperature"] = 0.0  # the checkpoint asks for greedy decoding
        if self.max_new_tokens is None:
            filled["max_new_tokens"] = gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        return dataclasses.replace(self, **filled)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator private to one request (None when greedy), seeded by params.seed or at random."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalties: Sequence[float]) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019): divide positive, multiply negative logits of seen tokens."""
    r = logits.new_tensor(penalties)[:, None]
    penalised = torch.where(logits > 0, logits / r, logits * r)
    return torch.where(seen, penalised, logits)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: Sequence[float],
                    frequency: Sequence[float]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: logit - frequency * count - presence * (count > 0)."""
    p = logits.new_tensor(presence)[:, None]
    f = logits.new_tensor(frequency)[:, None]
    return logits - f * counts - p * (counts > 0).to(logits.dtype)


def truncate(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p (nucleus) sets to -inf; the best token always stays."""
    vocab = logits.shape[-1]
    use_k = any(0 < k < vocab for k in top_k)
    use_p = any(p < 1 for p in top_p)
    if not (use_k or use_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None]
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if use_k:
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
        remove |= rank >= ks[:, None]
    if use_p:
        # Nucleus over what top-k left (as transformers does): drop a token once the mass ranked
        # above it already reaches top_p.
        probs = sorted_logits.masked_fill(remove, -math.inf).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= logits.new_tensor(list(top_p))[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None], seen: torch.Tensor | None = None,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V], each row with its own params and generator.

    Each sampled row draws only from its own generator, so a seeded request gets the same tokens
    whatever else shares its batch. `seen` [B, V] marks tokens already in each row's context;
    `counts` [B, V] counts each row's generated tokens (for presence and frequency penalties)."""
    logits = logits.float()
    if seen is not None and any(p.repetition_penalty != 1 for p in params):
        logits = apply_repetition_penalty(logits, seen, [p.repetition_penalty for p in params])
    if counts is not None:
        logits = apply_penalties(logits, counts, [p.presence_penalty or 0.0 for p in params],
                                 [p.frequency_penalty or 0.0 for p in params])
    if any(p.logit_bias for p in params):
        logits = logits.clone()  # the caller's logits stay as they were
    for row, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[row, ids] += logits.new_tensor(list(p.logit_bias.values()))
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    picked = [params[i] for i in rows]
    sub = logits[rows] if len(rows) < len(params) else logits
    sub = sub / sub.new_tensor([p.temperature for p in picked])[:, None]
    sub = truncate(sub, [p.top_k for p in picked], [p.top_p for p in picked])
    probs = sub.softmax(dim=-1)
    for j, i in enumerate(rows):
        tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return tokens
