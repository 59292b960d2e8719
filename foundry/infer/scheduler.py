"""Iteration-level scheduling: requests join and leave the running batch between steps, over one KV pool.

Each `step()` admits waiting requests while a slot is free, runs a token-budgeted amount of chunked
prefill for them (so running decodes wait at most one budget's worth of prefill), and one decode token
for every running row, each row at its own position (no left padding). With speculative decoding
(infer/speculative.py) a decode step may give a row several tokens; each goes through the stop rules in turn."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable

import torch

from foundry.core.errors import UserError
from foundry.infer.detokenize import TextStream
from foundry.infer.kv_pool import (
    DEFAULT_KV_CACHE_MEMORY,
    KVPool,
    PrefixCache,
    bytes_per_token,
    common_prefix,
)
from foundry.infer.sampling import SamplingParams, make_generator, sample_next
from foundry.infer.speculative import SpeculationStats, Speculator, Verified
from foundry.model import KVCache

if TYPE_CHECKING:
    from foundry.infer.engine import Engine


@dataclass
class TokenLogprob:
    """A sampled token's log-probability under the model, and the `top` most likely (id, logprob) pairs."""

    token_id: int
    logprob: float | None  # None only for a prompt's first token: nothing before it gives it a probability
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """One finished request. token_ids include a final stop token (eos, stop id); text never does."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop id, stop string, constraint done) or "length" (budget or context full)
    prompt_tokens: int
    completion_tokens: int
    # Timings (seconds from the call to generate/stream, so queueing behind other requests counts): not
    # part of what a completion is, so equal completions compare equal whatever the machine's speed.
    time_to_first_token: float = field(default=0.0, compare=False)
    seconds: float = field(default=0.0, compare=False)
    # Prompt tokens whose keys/values came from the prefix cache instead of being computed.
    cached_tokens: int = field(default=0, compare=False)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asked for them
    # One per prompt token when asked for (prompt_logprobs); the first one's logprob is None.
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the request's whole time (prefill included)."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Delta:
    """A piece of streamed output: new text of request `index`; `completion` is set on its last piece."""

    index: Any
    text: str
    completion: Completion | None = None
    token_ids: list[int] = field(default_factory=list)  # the tokens sampled since the request's last delta
    logprobs: list[TokenLogprob] | None = None  # for those tokens, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # on a request's first delta, when it asked for them


class Request:
    """One prompt on its way through the engine: its settings, its generator and what it produced so far."""

    def __init__(self, index: Any, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int],
                 tokenizer: Any, device: torch.device, started: float | None = None, vocab_size: int = 0):
        self.index = index
        self.started = time.perf_counter() if started is None else started
        self.first_token_at: float | None = None
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_ids = stop_ids | set(params.stop_token_ids)
        self.generator = make_generator(params, device)
        self.text = TextStream(tokenizer, prompt_ids, params.stop) if tokenizer is not None else None
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.cached_tokens = 0
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [TokenLogprob(prompt_ids[0], None)]
        self.prompt_logprobs_sent = False
        self.unsent: list[int] = []  # sampled tokens no delta carried yet
        # Counts of generated tokens, only for presence and frequency penalties.
        self.counts: torch.Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device)
        # Marks of the tokens in the context, only for a repetition penalty.
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty not in (None, 1) and vocab_size:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_ids, device=device)] = True

    def add(self, token: int) -> str:
        """Take one generated token; return the text it made safe to show, and decide whether we are done."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output.append(token)
        self.next_token = token
        self.unsent.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        constraint = self.params.constraint
        if constraint is not None:
            constraint.advance(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.text.finish() if self.text else ""
        delta = self.text.add(token) if self.text else ""
        if self.text and self.text.stopped:
            self.finish_reason = "stop"
        elif constraint is not None and constraint.is_finished():
            self.finish_reason = "stop"
            delta += self.text.finish() if self.text else ""
        elif len(self.output) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            delta += self.text.finish() if self.text else ""
        return delta

    def completion(self) -> Completion:
        """The finished result."""
        now = time.perf_counter()
        first = self.first_token_at if self.first_token_at is not None else now
        return Completion(self.text.text if self.text else "", list(self.output), self.finish_reason or "length",
                          len(self.prompt_ids), len(self.output), first - self.started, now - self.started,
                          self.cached_tokens, list(self.logprobs) if self.logprobs is not None else None,
                          self.prompt_logprobs)

    def score_prompt(self, start: int, logits: torch.Tensor) -> None:
        """Record the log-probabilities of prompt tokens start+1.. under the chunk's logits [T, V]."""
        targets = self.prompt_ids[start + 1:start + 1 + logits.shape[0]]
        if not targets:
            return
        logprobs = logits[:len(targets)].log_softmax(dim=-1)
        chosen = logprobs[torch.arange(len(targets)), torch.tensor(targets, device=logits.device)].tolist()
        k = self.params.prompt_logprobs
        top = logprobs.topk(k) if k else None
        for j, (token, value) in enumerate(zip(targets, chosen)):
            pairs = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else []
            self.prompt_logprobs.append(TokenLogprob(token, value, pairs))

    def delta(self, text: str) -> "Delta":
        """A delta carrying `text` and the tokens sampled since the last one."""
        tokens, self.unsent = self.unsent, []
        logprobs = self.logprobs[len(self.logprobs) - len(tokens):] if self.logprobs is not None else None
        completion = self.completion() if self.finish_reason is not None else None
        prompt = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            prompt, self.prompt_logprobs_sent = self.prompt_logprobs, True
        return Delta(self.index, text, completion, tokens, logprobs, prompt)


class Scheduler:
    """Runs an engine's model over many requests at once: add_request / abort between step() calls.

    Slots 0..len(decoding)-1 of the pool hold the decoding rows in order; the one request whose prompt is
    part-way through prefill sits in the slot right after them."""

    def __init__(self, engine: "Engine", kv_cache_memory: int | None = None, prefill_chunk: int = 256,
                 prefix_caching: bool = True):
        if prefill_chunk < 1:
            raise UserError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk}")
        self.engine = engine
        config = engine.config
        full = engine.max_batch_size * config.max_position_embeddings * bytes_per_token(config, engine.dtype)
        budget = kv_cache_memory if kv_cache_memory is not None else min(full, DEFAULT_KV_CACHE_MEMORY)
        if budget < bytes_per_token(config, engine.dtype):
            raise UserError(f"kv_cache_memory {budget} bytes holds not one token "
                            f"({bytes_per_token(config, engine.dtype)} bytes each): give more")
        self.pool = KVPool(config, budget, engine.max_batch_size, engine.device, engine.dtype)
        self.budget_bytes = budget
        # Prefill tokens per step; a prompt is cut at multiples of it whatever else runs, so that its
        # numbers (and greedy tokens) never depend on its neighbours.
        self.prefill_chunk = prefill_chunk
        self._waiting: deque[Request] = deque()
        self.decoding: list[Request] = []
        self.prefilling: Request | None = None
        self.requests: dict[Hashable, Request] = {}
        self.prefix_cache = PrefixCache() if prefix_caching else None
        self.speculator: Speculator | None = None
        if getattr(engine, "speculative", None) is not None:
            self.speculator = Speculator(engine.speculative, engine.draft, self.pool, prefill_chunk)

    # ---- public ------------------------------------------------------------------------

    def add_request(self, request_id: Hashable, prompt_ids: list[int], params: SamplingParams | None = None,
                    started: float | None = None) -> None:
        """Queue a prompt (token ids); raise UserError if it can never run. It starts at a later step()."""
        if request_id in self.requests:
            raise UserError(f"request id {request_id!r} is already in use")
        engine = self.engine
        p = (params or SamplingParams()).resolve(engine.generation_config)
        context = engine.config.max_position_embeddings
        if not prompt_ids:
            raise UserError("prompt is empty: give at least one token of text")
        if len(prompt_ids) >= context:
            raise UserError(f"prompt has {len(prompt_ids)} tokens; the model's context holds {context}, "
                            f"so at most {context - 1} leave room for an answer")
        if p.max_new_tokens > context - len(prompt_ids):
            p = dataclasses.replace(p, max_new_tokens=context - len(prompt_ids))  # stop when the context is full
        if p.stop and engine.tokenizer is None:
            raise UserError("stop strings need a tokenizer; this model has none")
        vocab = engine.config.vocab_size
        bad = [t for t in p.logit_bias if t >= vocab]
        if bad:
            raise UserError(f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        needed = len(prompt_ids) + p.max_new_tokens - 1  # the last sampled token is never fed back
        if needed > self.pool.slot_len:
            raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({p.max_new_tokens}) needs "
                            f"{needed} KV positions, but a slot of the KV cache holds {self.pool.slot_len}: "
                            f"raise kv_cache_memory or lower max_new_tokens")
        request = Request(request_id, list(prompt_ids), p, engine.stop_ids, engine.tokenizer, engine.device,
                          started, engine.config.vocab_size)
        self.requests[request_id] = request
        self._waiting.append(request)

    def abort(self, request_id: Hashable) -> None:
        """Drop a request wherever it is; its slot is free at once. Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request in self._waiting:
            self._waiting.remove(request)
        elif request is self.prefilling:
            self.pool.lengths[len(self.decoding)] = 0
            self.prefilling = None
        else:
            self._remove(self.decoding.index(request))

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._waiting or self.decoding or self.prefilling)

    @property
    def running(self) -> int:
        return len(self.decoding) + (self.prefilling is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_used_tokens(self) -> int:
        """KV positions held by running requests (the prefix cache's idle slots not counted)."""
        return sum(self.pool.lengths[:self.running])

    @property
    def kv_cached_tokens(self) -> int:
        """KV positions the prefix cache holds in idle slots."""
        return sum(self.pool.lengths[s] for s in self.prefix_cache.entries) if self.prefix_cache else 0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.pool.capacity_tokens

    @property
    def spec_stats(self) -> SpeculationStats | None:
        """Drafted / accepted token counters of speculative decoding (None when the engine does not speculate)."""
        return self.speculator.stats if self.speculator is not None else None

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """One iteration: a decode token (or a speculated few) for each running row, then prefill within the
        token budget."""
        rows: list[Request] = []
        logits: list[torch.Tensor] = []
        verified: list[tuple[Request, Verified]] = []
        if self.decoding:
            outcome = self.speculator.step(self) if self.speculator is not None else None
            if outcome is None:
                rows += self.decoding
                logits.append(self._decode())
            else:
                for request, result in zip(self.decoding, outcome):
                    if isinstance(result, Verified):
                        verified.append((request, result))
                    else:
                        rows.append(request)
                        logits.append(result[None])
        for request, row_logits in self._prefill():
            rows.append(request)
            logits.append(row_logits[None])
        if not rows and not verified:
            return []
        tokens = self._sample(rows, torch.cat(logits)) if rows else []
        deltas, finished = [], []
        for request, text in [(r, r.add(t)) for r, t in zip(rows, tokens)] + [(r, _take(r, v)) for r, v in verified]:
            if request.finish_reason is not None:
                deltas.append(request.delta(text))
                finished.append(request)
            elif text or request.logprobs is not None or (request.prompt_logprobs is not None
                                                          and not request.prompt_logprobs_sent):
                # asked for logprobs: a delta per token; asked for the prompt's: a first delta at once
                deltas.append(request.delta(text))
        for request in finished:
            self._retain(self.decoding.index(request))
        # Highest slot first: the row moved into a hole is then never one still to be removed.
        for j in sorted((self.decoding.index(r) for r in finished), reverse=True):
            del self.requests[self.decoding[j].index]
            self._remove(j)
        return deltas

    # ---- internals ---------------------------------------------------------------------

    def _remove(self, j: int) -> None:
        """Free decoding slot j: the last decoding row fills the hole, the prefilling one follows it down."""
        last = len(self.decoding) - 1
        self.pool.lengths[j] = 0
        if self.speculator is not None:
            self.speculator.drafter.start(j)
        if j != last:
            self._move(last, j)
            self.decoding[j] = self.decoding[last]
        self.decoding.pop()
        if self.prefilling is not None:
            self._move(last + 1, last)

    def _move(self, src: int, dst: int) -> None:
        """Move a running row's slot (a draft model's slot follows)."""
        self.pool.move(src, dst)
        if self.speculator is not None:
            self.speculator.drafter.move(src, dst)

    def _decode(self) -> torch.Tensor:
        """Feed each decoding row its last sampled token; their next-token logits [n, V]."""
        engine, n = self.engine, len(self.decoding)
        view = self.pool.decode_view(n)
        positions = view.positions
        ids = torch.tensor([r.next_token for r in self.decoding], device=engine.device)
        logits = engine._decode(ids[:, None], positions[:, None], view, None)
        view.commit()
        threshold = engine.long_rope_from
        if threshold is not None:
            for j in (positions == threshold).nonzero().flatten().tolist():
                logits[j] = self._recompute_long_row(j)
        return logits

    def _prefill(self) -> list[tuple[Request, torch.Tensor]]:
        """Run prompt chunks up to the step's token budget; the requests whose prompt is now done, with logits."""
        done, spent = [], 0
        while spent < self.prefill_chunk:
            if self.prefilling is None:
                if not self._waiting or len(self.decoding) >= self.pool.num_slots:
                    break
                self.prefilling = self._waiting.popleft()  # its slot is len(self.decoding)
                self._start(self.prefilling, len(self.decoding))
            request, slot = self.prefilling, len(self.decoding)
            start = self.pool.lengths[slot]
            size = self._chunk_size(request, start)
            if spent and spent + size > self.prefill_chunk:
                break  # the next chunk does not fit this step's budget
            ids = torch.tensor([request.prompt_ids[start:start + size]], device=self.engine.device)
            positions = torch.arange(start, start + size, device=self.engine.device)[None]
            every = request.prompt_logprobs is not None  # the prompt's own tokens are scored too
            logits = self.engine._logits(ids, positions, self.pool.prefill_view(slot), None, every)
            if every:
                request.score_prompt(start, logits[0])
                logits = logits[:, -1]
            spent += size
            if start + size == len(request.prompt_ids):
                self.decoding.append(request)  # already in slot len(decoding)
                self.prefilling = None
                done.append((request, logits[0]))
        return done

    # ---- prefix cache ------------------------------------------------------------------

    def _fed(self, slot: int) -> list[int]:
        """The tokens whose keys/values decoding slot `slot` holds."""
        request = self.decoding[slot]
        return (request.prompt_ids + request.output)[:self.pool.lengths[slot]]

    def _idle_slot(self) -> int | None:
        """A slot neither running nor caching, if any."""
        taken = set(self.prefix_cache.entries) if self.prefix_cache else set()
        return next((s for s in range(self.running, self.pool.num_slots) if s not in taken), None)

    def _retain(self, slot: int) -> None:
        """Keep a finishing request's keys/values in an idle slot for prompts that start like it."""
        cache = self.prefix_cache
        if cache is None:
            return
        tokens = self._fed(slot)
        target = cache.redundant(tokens)
        if target == -1:
            return  # an entry already holds all of it
        if target is not None:
            del cache.entries[target]
        else:
            target = self._idle_slot()
            target = cache.evict() if target is None else target
        if target is not None:
            self.pool.copy(slot, target)
            cache.keep(target, tokens)

    def _start(self, request: Request, slot: int) -> None:
        """Make `slot` ready for a new prompt, its longest cached prefix already in place."""
        if self.speculator is not None:
            self.speculator.drafter.start(slot)
        cache = self.prefix_cache
        if cache is None:
            self.pool.lengths[slot] = 0
            return
        best, source = self._longest_prefix(request.prompt_ids)
        if request.prompt_logprobs is not None:
            best, source = 0, None  # scoring the prompt needs the logits of all of it: compute it afresh
        if slot in cache.entries:  # an idle slot's entry is in the way: keep it elsewhere if there is room
            tokens = cache.entries.pop(slot)
            idle = self._idle_slot()
            if idle is not None:
                self.pool.copy(slot, idle)
                cache.keep(idle, tokens)
                source = idle if source == slot else source
        if source is not None and source != slot:
            self.pool.copy(source, slot, best)
        self.pool.lengths[slot] = best  # 0 without a match; the prefix in place when the entry was this slot's
        if source in cache.entries:
            cache.entries.move_to_end(source)
        request.cached_tokens = best

    def _longest_prefix(self, prompt: list[int]) -> tuple[int, int | None]:
        """The most leading prompt tokens some slot holds keys/values for, and that slot."""
        candidates = [(s, self._fed(s)) for s in range(len(self.decoding))] + list(self.prefix_cache.entries.items())
        threshold = self.engine.long_rope_from
        best, source = 0, None
        for slot, tokens in candidates:
            if threshold is not None and (len(tokens) > threshold) != (len(prompt) > threshold):
                continue  # its keys were rotated with the other LongRoPE factor set
            n = min(common_prefix(tokens, prompt), len(prompt) - 1)  # the last prompt token is always fed
            if n > best:
                best, source = n, slot
        return best, source

    def _chunk_size(self, request: Request, start: int) -> int:
        prompt = len(request.prompt_ids)
        threshold = self.engine.long_rope_from
        if threshold is not None and prompt > threshold:
            # LongRoPE picks the long factors for a whole prompt longer than the original context; chunks of
            # it would each pick by their own end. So such a prompt is prefilled in one piece.
            return prompt - start
        return min(self.prefill_chunk, prompt - start)

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        vocab = logits.shape[-1]
        # Log-probabilities of the model's own distribution (before penalties, bias, constraint, temperature).
        wanted = [j for j, r in enumerate(rows) if r.logprobs is not None]
        logprobs = logits[wanted].log_softmax(dim=-1) if wanted else None
        for j, r in enumerate(rows):
            constraint = r.params.constraint
            allowed = constraint.mask(vocab) if constraint is not None else None
            if allowed is not None:
                logits[j].masked_fill_(~allowed.to(logits.device, torch.bool), -math.inf)
        seen = None
        if any(r.seen is not None for r in rows):
            empty = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            seen = torch.stack([r.seen if r.seen is not None else empty for r in rows])
        counts = None
        if any(r.counts is not None for r in rows):
            zero = torch.zeros(vocab, device=logits.device)
            counts = torch.stack([r.counts if r.counts is not None else zero for r in rows])
        tokens = sample_next(logits, [r.params for r in rows], [r.generator for r in rows], seen, counts).tolist()
        for i, j in enumerate(wanted):
            rows[j].logprobs.append(_logprob(logprobs[i], tokens[j], rows[j].params.logprobs))
        return tokens

    def _recompute_long_row(self, row: int) -> torch.Tensor:
        """Redo slot `row` with LongRoPE's long factors, now that its sequence outgrew the original context.

        Its earlier keys were rotated with the short factors; transformers recomputes the whole sequence at
        this point, and so do we (once per request), so that one sequence gets the same tokens as there.
        Returns the row's new last logits."""
        engine, request = self.engine, self.decoding[row]
        ids = request.prompt_ids + request.output  # every token fed so far, the one just fed included
        length = len(ids)
        fresh = KVCache(engine.config, 1, length, engine.device, engine.dtype)
        positions = torch.arange(length, device=engine.device)[None]
        logits = engine._logits(torch.tensor([ids], device=engine.device), positions, fresh, None)
        for layer in range(engine.config.num_hidden_layers):
            self.pool.keys[layer][row, :, :length] = fresh.keys[layer][0]
            self.pool.values[layer][row, :, :length] = fresh.values[layer][0]
        return logits[0]


def _logprob(row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """A token's entry from its position's log-probabilities [V], with the k most likely."""
    top = row.topk(k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(token, float(row[token]), pairs)


def _take(request: Request, verified: Verified) -> str:
    """Give a request its speculated tokens one at a time, through the stop rules; the text they made safe."""
    logprobs = verified.logits.log_softmax(dim=-1) if request.logprobs is not None else None
    text = ""
    for i, token in enumerate(verified.tokens):
        if logprobs is not None:
            request.logprobs.append(_logprob(logprobs[i], token, request.params.logprobs))
        text += request.add(token)
        if request.finish_reason is not None:
            break
    return text
