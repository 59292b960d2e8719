"""The inference engine: batched, KV-cached decoding with per-request sampling, stop rules and streaming.

This is the one generation path of foundry: `generate`, `chat`, generative evaluation and the
server all come through `Engine`."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from foundry.core.errors import UserError
from foundry.infer.detokenize import TextStream
from foundry.infer.prepack import can_prepack, prepack_linears
from foundry.infer.sampling import SamplingParams, make_generator, sample_next
from foundry.infer.static_cache import StaticKVCache
from foundry.model import KVCache, Transformer
from foundry.model.rope import long_context_threshold

Prompt = str | Sequence[int]


@dataclass
class Completion:
    """One finished request. token_ids include a final stop token (eos, stop id); text never does."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop id or stop string) or "length" (token budget or context full)
    prompt_tokens: int
    completion_tokens: int
    # Timings (seconds from the call to generate/stream, so queueing behind earlier batches counts): not
    # part of what a completion is, so equal completions compare equal whatever the machine's speed.
    time_to_first_token: float = field(default=0.0, compare=False)
    seconds: float = field(default=0.0, compare=False)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the request's whole time (prefill included)."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Delta:
    """A piece of streamed output: new text of request `index`; `completion` is set on its last piece."""

    index: int
    text: str
    completion: Completion | None = None


class Request:
    """One prompt on its way through the engine: its settings, its generator and what it produced so far."""

    def __init__(self, index: int, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int],
                 tokenizer: Any, device: torch.device, started: float | None = None):
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

    def add(self, token: int) -> str:
        """Take one generated token; return the text it made safe to show, and decide whether we are done."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.text.finish() if self.text else ""
        delta = self.text.add(token) if self.text else ""
        if self.text and self.text.stopped:
            self.finish_reason = "stop"
        elif len(self.output) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            delta += self.text.finish() if self.text else ""
        return delta

    def completion(self) -> Completion:
        """The finished result."""
        now = time.perf_counter()
        first = self.first_token_at if self.first_token_at is not None else now
        return Completion(self.text.text if self.text else "", list(self.output), self.finish_reason or "length",
                          len(self.prompt_ids), len(self.output), first - self.started, now - self.started)


class Engine:
    """Generates text from a Transformer: left-padded batches, one preallocated KV cache, one token a step."""

    def __init__(self, model: Transformer, tokenizer: Any = None, device: str | torch.device = "cpu",
                 generation_config: dict[str, Any] | None = None, max_batch_size: int = 64,
                 compile: bool = False, prepack: bool = False):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()  # note: a training loop must call .train() again after
        self.config = model.config
        self.dtype = next(model.parameters()).dtype  # of the KV cache
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or {})
        self.max_batch_size = max_batch_size
        # compile: the decode step becomes one graph (dynamic in batch size and cache length) over a
        # static cache. It costs tens of seconds once per process, so it is for long sessions.
        self.static_cache = compile
        # prepack: swap large fp32 linears for oneDNN-packed ones (CPU). It changes the model in place,
        # so it is off for a model handed in (it may still be training) and on in Engine.load.
        self.prepacked = prepack and not compile and can_prepack(self.model, self.device)
        if self.prepacked:
            prepack_linears(self.model)
        self._decode = torch.compile(self._logits, dynamic=True) if compile else self._logits
        # eos from the tokenizer (plus end-of-turn markers), generation_config.json and config.json.
        self.stop_ids = set(getattr(tokenizer, "stop_ids", None) or ())
        self.stop_ids |= _id_set(self.generation_config.get("eos_token_id")) | _id_set(self.config.eos_token_id)
        self.pad_id = self._pad_id(tokenizer)
        # LongRoPE (Phi-3): the position at which a sequence outgrows the original context and changes factors.
        self.long_rope_from = long_context_threshold(self.config)

    def _pad_id(self, tokenizer: Any) -> int:
        """The id left padding is filled with: generation_config's, config.json's, the tokenizer's, else 0.

        Padding is masked out, so any id in the vocabulary serves; 0 is a real choice, not "unset"."""
        for candidate in (self.generation_config.get("pad_token_id"), self.config.pad_token_id,
                          getattr(tokenizer, "pad_id", None)):
            if isinstance(candidate, int) and 0 <= candidate < self.config.vocab_size:
                return candidate
        return 0

    @classmethod
    def load(cls, spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             prepack: bool = True, **kwargs: Any) -> "Engine":
        """An engine for a model directory, or a run directory's newest checkpoint (the engine owns its model)."""
        from foundry import hub  # hub reads files; the engine itself only needs a model

        loaded = hub.load(spec, device=device, dtype=dtype)
        return cls(loaded.model, loaded.tokenizer, device, loaded.generation_config, prepack=prepack, **kwargs)

    # ---- public ------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Complete every prompt (text or token ids); results in prompt order."""
        results: list[Completion | None] = [None] * len(_listed(prompts))
        for delta in self.stream(prompts, params):
            if delta.completion is not None:
                results[delta.index] = delta.completion
        return results  # type: ignore[return-value]

    def stream(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[Delta]:
        """Complete every prompt, yielding text deltas as they become safe to show (index = prompt position)."""
        requests = self._requests(prompts, params)
        # Similar lengths share a batch, so little compute goes to padding.
        requests.sort(key=lambda r: len(r.prompt_ids))
        for start in range(0, len(requests), self.max_batch_size):
            yield from self._run(requests[start:start + self.max_batch_size])

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt given as text (tokenizer's special tokens added) or as ids (checked)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("this model has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise UserError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if not ids:
            raise UserError("prompt is empty: give at least one token of text")
        return ids

    # ---- internals ---------------------------------------------------------------------

    def _requests(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None
                  ) -> list[Request]:
        prompts = _listed(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise UserError(f"got {len(params)} sampling settings for {len(prompts)} prompts")
        context = self.config.max_position_embeddings
        started = time.perf_counter()
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids = self.encode(prompt)
            p = p.resolve(self.generation_config)
            if len(ids) >= context:
                raise UserError(f"prompt {i} has {len(ids)} tokens; the model's context holds {context}, "
                                f"so at most {context - 1} leave room for an answer")
            if p.max_new_tokens > context - len(ids):
                p = dataclasses.replace(p, max_new_tokens=context - len(ids))  # stop when the context is full
            if p.stop and self.tokenizer is None:
                raise UserError("stop strings need a tokenizer; this model has none")
            requests.append(Request(i, ids, p, self.stop_ids, self.tokenizer, self.device, started))
        return requests

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                pad_mask: torch.Tensor | None) -> torch.Tensor:
        # Only the last position's logits are needed: skip the output head for the rest of the prompt.
        hidden = self.model.hidden_states(ids, positions, cache, pad_mask)
        return self.model.logits(hidden[:, -1]).float()

    @torch.inference_mode()
    def _run(self, requests: list[Request]) -> Iterator[Delta]:
        """Prefill a batch once, then decode one token a step for the rows still running."""
        batch, dev = len(requests), self.device
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        pad_mask = torch.zeros(batch, width, dtype=torch.bool)
        for row, r in enumerate(requests):  # left padding: every row's last prompt token is in the last slot
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            pad_mask[row, width - len(r.prompt_ids):] = True
        ids, pad_mask = ids.to(dev), pad_mask.to(dev)
        positions = (pad_mask.cumsum(1) - 1).clamp(min=0)
        # The last sampled token is never fed back, hence the -1.
        slots = width + max(r.params.max_new_tokens for r in requests) - 1
        cache = (StaticKVCache if self.static_cache else KVCache)(self.config, batch, slots, dev, self.dtype)
        seen = _seen_tokens(requests, ids, pad_mask, self.config.vocab_size)

        logits = self._logits(ids, positions, cache, pad_mask)
        next_pos = pad_mask.sum(1)
        rows = list(requests)  # rows[j] is the request in cache row j
        while True:
            tokens = sample_next(logits, [r.params for r in rows], [r.generator for r in rows], seen)
            if seen is not None:
                seen[torch.arange(len(rows), device=dev), tokens] = True
            keep = []
            for j, (r, token) in enumerate(zip(rows, tokens.tolist())):
                text = r.add(token)
                if r.finish_reason is not None:
                    yield Delta(r.index, text, r.completion())
                else:
                    keep.append(j)
                    if text:
                        yield Delta(r.index, text)
            if not keep:
                return
            if len(keep) < len(rows):
                # Finished rows leave the batch so that they cost no more compute.
                kept = torch.tensor(keep, device=dev)
                cache.reorder(kept)
                tokens, next_pos = tokens[kept], next_pos[kept]
                seen = seen[kept] if seen is not None else None
                rows = [rows[j] for j in keep]
            logits = self._decode(tokens[:, None], next_pos[:, None], cache, None)
            if self.long_rope_from is not None:
                for j in (next_pos == self.long_rope_from).nonzero().flatten().tolist():
                    logits[j] = self._recompute_long_row(rows[j], j, cache)
            next_pos = next_pos + 1

    def _recompute_long_row(self, request: Request, row: int, cache: KVCache) -> torch.Tensor:
        """Redo cache row `row` with LongRoPE's long factors, now that its sequence outgrew the original context.

        Its earlier keys were rotated with the short factors; transformers recomputes the whole sequence at
        this point, and so do we (once per request), so that one sequence gets the same tokens as there.
        Returns the row's new last logits."""
        ids = request.prompt_ids + request.output  # every token fed so far, the one just fed included
        length = cache.length
        pad = length - len(ids)  # the row's left padding in the shared cache
        row_ids = torch.tensor([[self.pad_id] * pad + ids], device=self.device)
        pad_mask = torch.arange(length, device=self.device)[None] >= pad
        positions = (pad_mask.cumsum(1) - 1).clamp(min=0)
        fresh = KVCache(self.config, 1, length, self.device, self.dtype)
        logits = self._logits(row_ids, positions, fresh, pad_mask)
        for layer in range(self.config.num_hidden_layers):
            cache.keys[layer][row, :, :length] = fresh.keys[layer][0]
            cache.values[layer][row, :, :length] = fresh.values[layer][0]
        return logits[0]


def _seen_tokens(requests: list[Request], ids: torch.Tensor, pad_mask: torch.Tensor,
                 vocab: int) -> torch.Tensor | None:
    """[B, V] marks of the tokens in each prompt, kept only when some request uses a repetition penalty."""
    if all(r.params.repetition_penalty == 1 for r in requests):
        return None
    seen = torch.zeros(len(requests), vocab, dtype=torch.bool, device=ids.device)
    rows = torch.arange(len(requests), device=ids.device)[:, None].expand_as(ids)
    seen[rows[pad_mask], ids[pad_mask]] = True
    return seen


def _listed(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    # A lone string is one prompt, not a list of one-character prompts.
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _id_set(value: int | Iterable[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)
