"""Speculative decoding, greedy-exact: a cheap drafter proposes k tokens, the target checks them in one call.

Drafters: prompt lookup (`ngram`: the tokens that followed the latest earlier occurrence of the row's
longest suffix n-gram, no second model) and a draft model (`draft`: a smaller Transformer with its own KV
pool, slot for slot beside the target's, proposing greedily).

Verification: every decoding row feeds [its last token, d1..dk] at its own positions in ONE target call
(kv_pool.SpanView; a row with fewer drafts is padded inside the view, rows with none feed their one
token), with logits at every position. A row keeps the longest prefix of drafts equal to the target's
own choice at each position, then the target's choice at the first mismatch (or the bonus token after
all k): 1..k+1 tokens per step. Its KV length becomes what it kept; entries past it are dead.

The rule for who speculates (so that the output is provably the target's alone, token for token): a row
speculates only when its next tokens are a function of the target's logits at each position and nothing
else that changes along the way, i.e. temperature 0, no constraint, no repetition / presence / frequency
penalty (they depend on the tokens before each position). logit_bias is allowed (it is the same at every
position and applied per position); logprobs are allowed (they are the target's at each kept position).
Other rows feed one token in the same call and sample as usual. Stop rules (eos, stop ids and strings,
max_new_tokens) are applied by the scheduler to each kept token in order, so a stop inside a run ends
the output where plain decoding ends it; drafts are capped so that no row passes max_new_tokens, its KV
slot or (Phi-3's LongRoPE) the position where its factors change, where plain decoding recomputes the row.

Batching: the target's step costs about the same for k+1 tokens as for one while it is bound by reading
the weights (few rows); with many rows it is bound by compute, so drafts that are rejected cost real time
and every non-speculating row is padded to k+1. So rows speculate only while at most `max_rows` decode.

Exactness is up to floating point: the verification call computes a row's logits in a [k+1]-token batch
rather than a 1-token one, so the numbers may differ in the last bits from plain decoding's, and an exact
tie between the two best tokens could go either way (as batch composition can already in plain decoding)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from foundry.core.errors import UserError
from foundry.infer.kv_pool import KVPool, bytes_per_token
from foundry.infer.sampling import SamplingParams, sample_next
from foundry.model.rope import long_context_threshold

if TYPE_CHECKING:
    from foundry.infer.scheduler import Request, Scheduler
    from foundry.model import Transformer

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How the engine speculates: `method` ngram or draft, `num_tokens` drafts per step (k), the n-gram
    sizes tried (longest first), and the most decoding rows at which speculation still runs."""

    method: str = "ngram"
    num_tokens: int = 4
    ngram_max: int = 3
    ngram_min: int = 1
    max_rows: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise UserError(f"speculative tokens must be a positive integer, got {self.num_tokens!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise UserError(f"n-gram sizes must satisfy 1 <= min <= max, got {self.ngram_min}..{self.ngram_max}")
        if self.max_rows < 1:
            raise UserError(f"speculative max_rows must be at least 1, got {self.max_rows}")


@dataclass(frozen=True)
class SpeculationStats:
    """Counters since the scheduler started (replaced whole after each step, so a reader sees one moment).

    steps: verification calls; rows: row verifications (a row with at least one draft in such a call);
    drafted / accepted: draft tokens proposed / equal to the target's choice there (counted whether or not
    a stop then cuts the row's output short)."""

    steps: int = 0
    rows: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (0 before any draft)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per row verification."""
        return self.accepted / self.rows if self.rows else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a verified row gains per step: its accepted drafts and the target's own (1 without drafts)."""
        return 1 + self.mean_accepted


@dataclass
class Verified:
    """A speculating row's outcome: the tokens it keeps, in order, and the target's logits [len(tokens), V]
    that chose them (for logprobs)."""

    tokens: list[int]
    logits: torch.Tensor


def speculates(params: SamplingParams) -> bool:
    """Whether a request's tokens are provably the same when speculated (see the module docstring)."""
    return (params.temperature == 0 and params.constraint is None and params.repetition_penalty in (None, 1)
            and not params.presence_penalty and not params.frequency_penalty)


def ngram_drafts(tokens: list[int], k: int, longest: int = 3, shortest: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram of `tokens`.

    The copy runs on into the tokens it proposes, so a match near the end continues its period (a b a b ..)."""
    for n in range(min(longest, len(tokens) - 1), shortest - 1, -1):
        suffix = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                out = list(tokens)
                for j in range(k):
                    out.append(out[i + n + j])
                return out[len(tokens):]
    return []


class NgramDrafter:
    """Prompt lookup: drafts from the row's own tokens; it keeps no state."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def room(self, length: int) -> int:
        """No limit of its own on a row's drafts."""
        return 1 << 30

    def propose(self, rows: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        """Drafts per slot for (slot, row tokens with the one not yet fed last, most drafts) rows."""
        c = self.config
        return {slot: ngram_drafts(tokens, limit, c.ngram_max, c.ngram_min) for slot, tokens, limit in rows}

    def start(self, slot: int) -> None:
        """Nothing to reset."""

    def move(self, src: int, dst: int) -> None:
        """Nothing to move."""

    def rollback(self, slot: int, length: int) -> None:
        """Nothing to roll back."""


class DraftModelDrafter:
    """A draft Transformer with its own KV pool, slot s beside the target's slot s.

    A row's draft slot may lag the target's (rows that did not speculate, or a new prompt): it catches up on
    the tokens it has not seen, inside its first batched call when they are few, else by a prefill of them
    (in chunks, as the scheduler prefills prompts); then it proposes greedily, batched over the speculating
    rows. After verification it is cut back to the positions the target kept. A LongRoPE draft recomputes a
    row once, in one piece, when the row outgrows the original context (as the target does)."""

    def __init__(self, model: Transformer, target_pool: KVPool, prefill_chunk: int):
        self.model = model
        param = next(model.parameters())
        per_token = bytes_per_token(model.config, param.dtype)
        slots, slot_len = target_pool.num_slots, target_pool.slot_len
        self.pool = KVPool(model.config, slots * slot_len * per_token, slots, target_pool.device, param.dtype,
                           slot_len=slot_len)
        self.prefill_chunk = prefill_chunk
        self.device = target_pool.device
        self.threshold = long_context_threshold(model.config)
        self.long = [False] * slots  # whether a slot's keys were rotated with LongRoPE's long factors

    def room(self, length: int) -> int:
        """Drafts a row whose target holds `length` positions can take: the draft writes up to length + k - 1."""
        return self.pool.slot_len - length

    def propose(self, rows: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        """Greedy drafts per slot for (slot, row tokens with the one not yet fed last, most drafts) rows."""
        drafts: dict[int, list[int]] = {}
        batched = []
        for slot, tokens, limit in rows:
            if self.threshold is not None and len(tokens) > self.threshold and not self.long[slot]:
                self.pool.lengths[slot], self.long[slot] = 0, True  # its keys were rotated with the short factors
            if len(tokens) - self.pool.lengths[slot] > limit + 1:
                drafts[slot] = [self._prefill(slot, tokens)]
            else:
                batched.append((slot, tokens[self.pool.lengths[slot]:]))
        if batched:
            firsts = self._next([slot for slot, _ in batched], [feed for _, feed in batched])
            drafts.update((slot, [token]) for (slot, _), token in zip(batched, firsts))
        limits = {slot: limit for slot, _, limit in rows}
        for step in range(1, max(limits.values(), default=0)):
            active = [slot for slot in drafts if limits[slot] > step]
            for slot, token in zip(active, self._next(active, [[drafts[slot][-1]] for slot in active])):
                drafts[slot].append(token)
        return drafts

    def start(self, slot: int) -> None:
        """A new request in `slot`: the draft has seen none of it."""
        self.pool.lengths[slot], self.long[slot] = 0, False

    def move(self, src: int, dst: int) -> None:
        """Follow the target's slot move."""
        self.pool.move(src, dst)
        self.long[dst], self.long[src] = self.long[src], False

    def rollback(self, slot: int, length: int) -> None:
        """Forget the draft's positions past what the target kept."""
        self.pool.lengths[slot] = min(self.pool.lengths[slot], length)

    def _prefill(self, slot: int, tokens: list[int]) -> int:
        # The tokens the slot has not seen, in chunks (one piece for a LongRoPE-long row); the greedy next one.
        start = self.pool.lengths[slot]
        long = self.threshold is not None and len(tokens) > self.threshold
        while True:
            chunk = tokens[start:] if long else tokens[start:start + self.prefill_chunk]
            ids = torch.tensor([chunk], device=self.device)
            positions = torch.arange(start, start + len(chunk), device=self.device)[None]
            hidden = self.model.hidden_states(ids, positions, self.pool.prefill_view(slot), None)
            start += len(chunk)
            if start == len(tokens):
                return int(self.model.logits(hidden[:, -1]).argmax(-1))

    def _next(self, slots: list[int], feeds: list[list[int]]) -> list[int]:
        # Feed each slot its tokens in one call; the draft's greedy choice after each row's last one.
        view = self.pool.span_view(slots, [len(f) for f in feeds])
        ids = torch.tensor([_padded(f, view.width) for f in feeds], device=self.device)
        hidden = self.model.hidden_states(ids, view.positions, view, None)
        view.commit()
        last = torch.tensor([len(f) - 1 for f in feeds], device=self.device)
        return self.model.logits(hidden[torch.arange(len(feeds), device=self.device), last]).argmax(-1).tolist()


def _padded(tokens: list[int], width: int) -> list[int]:
    return tokens + [tokens[-1]] * (width - len(tokens))


class Speculator:
    """Runs a scheduler's decode steps speculatively (or declines, and the scheduler decodes plainly)."""

    def __init__(self, config: SpeculativeConfig, draft: Transformer | None, pool: KVPool, prefill_chunk: int):
        self.config = config
        self.drafter: NgramDrafter | DraftModelDrafter = (
            DraftModelDrafter(draft, pool, prefill_chunk) if draft is not None else NgramDrafter(config))
        self.stats = SpeculationStats()

    def step(self, scheduler: Scheduler) -> list[torch.Tensor | Verified] | None:
        """Per decoding row: its next-token logits [V] (a row that did not speculate) or what it keeps.

        None when no row speculates this step (too many rows, no drafts): the scheduler decodes plainly.
        Sets the rows' KV lengths to what they keep."""
        engine, pool, rows = scheduler.engine, scheduler.pool, scheduler.decoding
        threshold = engine.long_rope_from
        if len(rows) > self.config.max_rows:
            return None
        if threshold is not None and threshold in pool.lengths[:len(rows)]:
            return None  # a row crosses LongRoPE's threshold now: the plain decode step recomputes it
        limits = [self._limit(r, pool.lengths[j], pool, threshold) for j, r in enumerate(rows)]
        drafts = self.drafter.propose([(j, r.prompt_ids + r.output, limit)
                                       for j, (r, limit) in enumerate(zip(rows, limits)) if limit > 0])
        drafted = [drafts.get(j, []) for j in range(len(rows))]
        if not any(drafted):
            return None
        feeds = [[r.next_token] + d for r, d in zip(rows, drafted)]
        view = pool.span_view(list(range(len(rows))), [len(f) for f in feeds])
        ids = torch.tensor([_padded(f, view.width) for f in feeds], device=engine.device)
        logits = engine._decode(ids, view.positions, view, None, every=True)  # compiled when the engine is
        out: list[torch.Tensor | Verified] = []
        verified = drafted_total = accepted_total = 0
        for j, (request, d) in enumerate(zip(rows, drafted)):
            if not d:
                pool.lengths[j] += 1
                out.append(logits[j, 0])
                continue
            row = logits[j, :len(d) + 1]
            choices = sample_next(row, [request.params] * len(row), [None] * len(row)).tolist()
            kept = 0
            while kept < len(d) and d[kept] == choices[kept]:
                kept += 1
            pool.lengths[j] += 1 + kept
            self.drafter.rollback(j, pool.lengths[j])
            out.append(Verified(choices[:kept + 1], row[:kept + 1]))
            verified, drafted_total, accepted_total = verified + 1, drafted_total + len(d), accepted_total + kept
        s = self.stats
        self.stats = replace(s, steps=s.steps + 1, rows=s.rows + verified, drafted=s.drafted + drafted_total,
                             accepted=s.accepted + accepted_total)
        return out

    def _limit(self, request: Request, length: int, pool: KVPool, threshold: int | None) -> int:
        # The most drafts a row may take: none unless it speculates; never past its budget, slot or threshold.
        if not speculates(request.params):
            return 0
        limit = min(self.config.num_tokens, request.params.max_new_tokens - len(request.output) - 1,
                    pool.slot_len - length - 1, self.drafter.room(length))
        if threshold is not None and length < threshold:
            limit = min(limit, threshold - 1 - length)  # every position of the step on the short factors
        return max(limit, 0)
