"""The inference engine: batched, KV-cached decoding with per-request sampling, stop rules and streaming.

This is the one generation path of foundry: `generate`, `chat`, generative evaluation and the
server all come through `Engine`."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from foundry.core.errors import UserError
from foundry.infer.compiled import compile_step
from foundry.infer.prepack import can_prepack, prepack_linears
from foundry.infer.sampling import SamplingParams
from foundry.infer.scheduler import Completion, Delta, Request, Scheduler, TokenLogprob  # noqa: F401  (re-exported)
from foundry.model import Transformer
from foundry.model.rope import long_context_threshold

Prompt = str | Sequence[int]


class Engine:
    """Generates text from a Transformer through one Scheduler: continuous batching over one persistent KV pool."""

    def __init__(self, model: Transformer, tokenizer: Any = None, device: str | torch.device = "cpu",
                 generation_config: dict[str, Any] | None = None, max_batch_size: int = 64,
                 compile: bool = False, prepack: bool = False, kv_cache_memory: int | None = None,
                 prefill_chunk: int = 256, prefix_caching: bool = True):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()  # note: a training loop must call .train() again after
        self.config = model.config
        self.dtype = next(model.parameters()).dtype  # of the KV cache
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or {})
        self.max_batch_size = max_batch_size
        # compile: the decode step becomes a compiled graph for every batch size and length (infer/compiled.py).
        # It costs a minute or two once per process on two cores, so it is for long sessions.
        # prepack: swap large fp32 linears for oneDNN-packed ones (CPU). It changes the model in place,
        # so it is off for a model handed in (it may still be training) and on in Engine.load.
        self.prepacked = prepack and not compile and can_prepack(self.model, self.device)
        if self.prepacked:
            prepack_linears(self.model)
        self._decode = compile_step(self._logits, self.device) if compile else self._logits
        # eos from the tokenizer (plus end-of-turn markers), generation_config.json and config.json.
        self.stop_ids = set(getattr(tokenizer, "stop_ids", None) or ())
        self.stop_ids |= _id_set(self.generation_config.get("eos_token_id")) | _id_set(self.config.eos_token_id)
        self.pad_id = self._pad_id(tokenizer)
        # LongRoPE (Phi-3): the position at which a sequence outgrows the original context and changes factors.
        self.long_rope_from = long_context_threshold(self.config)
        # kv_cache_memory: the KV pool's size in bytes (None: max_batch_size full contexts, at most 2 GiB).
        # prefill_chunk: prompt tokens per scheduler step, so running decodes wait at most that long.
        self.kv_cache_memory = kv_cache_memory
        self.prefill_chunk = prefill_chunk
        # prefix_caching: finished sequences stay in idle KV slots; a prompt starting alike copies their KV.
        self.prefix_caching = prefix_caching
        self._scheduler: Scheduler | None = None
        self._tags = itertools.count()
        self._outbox: defaultdict[int, list[Delta]] = defaultdict(list)
        self._lock = threading.RLock()  # streams of several threads share the scheduler

    def _pad_id(self, tokenizer: Any) -> int:
        """The model's padding id: generation_config's, config.json's, the tokenizer's, else 0.

        The engine itself never pads (each row keeps its own length); 0 is a real choice, not "unset"."""
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
        """Complete every prompt, yielding text deltas as they become safe to show (index = prompt position).

        The prompts go through the engine's one Scheduler, beside those of any other open stream, from
        this thread or others: whichever stream needs output next runs the next step for all of them.
        Closing the generator early aborts its unfinished requests and frees their cache."""
        prompts = _listed(prompts)
        params = self._params(len(prompts), params)
        prompt_ids = [self.encode(p) for p in prompts]  # every prompt is checked before any output
        tag, started = next(self._tags), time.perf_counter()
        pending: set[int] = set()
        try:
            with self._lock:
                scheduler = self.scheduler
                for i, (ids, p) in enumerate(zip(prompt_ids, params)):
                    try:
                        scheduler.add_request((tag, i), ids, p, started)
                    except UserError as e:
                        raise UserError(f"prompt {i}: {e}") from None
                    pending.add(i)
            while pending:
                with self._lock:  # one step at a time; the deltas are yielded outside it
                    mine = self._outbox.pop(tag, [])
                    if not mine:
                        if not scheduler.has_work():
                            raise RuntimeError("scheduler has no work but requests are pending")
                        for delta in scheduler.step():  # another stream's deltas wait in its outbox
                            self._outbox[delta.index[0]].append(delta)
                        mine = self._outbox.pop(tag, [])
                for delta in mine:
                    if delta.completion is not None:
                        pending.discard(delta.index[1])
                    yield dataclasses.replace(delta, index=delta.index[1])
        finally:
            with self._lock:
                for i in pending:
                    self.scheduler.abort((tag, i))
                self._outbox.pop(tag, None)

    def warm_up(self) -> None:
        """Run decode steps at batch 1 and 2 now, so that a compiled engine compiles its graphs here (tens of
        seconds, once) rather than inside the first requests; the KV pool is then started afresh."""
        greedy = SamplingParams(temperature=0.0, max_new_tokens=3)
        stop_ids, self.stop_ids = self.stop_ids, set()  # an eos must not end a warm-up row before it decodes
        try:
            self.generate([[0]], greedy)  # batch 1, at two lengths: the length becomes symbolic
            self.generate([[1], [2]], greedy)  # every larger batch
        finally:
            self.stop_ids = stop_ids
            self._scheduler = None

    @property
    def scheduler(self) -> Scheduler:
        """The engine's one scheduler and KV pool (allocated at first use, then kept)."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self, self.kv_cache_memory, self.prefill_chunk, self.prefix_caching)
        return self._scheduler

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

    def _params(self, count: int, params: SamplingParams | Sequence[SamplingParams] | None) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * count
        params = list(params)
        if len(params) != count:
            raise UserError(f"got {len(params)} sampling settings for {count} prompts")
        return params

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any,
                pad_mask: torch.Tensor | None, every: bool = False) -> torch.Tensor:
        """Next-token logits [B, V] of the last position ([B, T, V] of every position when `every`)."""
        hidden = self.model.hidden_states(ids, positions, cache, pad_mask)
        # Usually only the last position's logits are needed: then the head skips the rest of the prompt.
        return self.model.logits(hidden if every else hidden[:, -1]).float()


def _listed(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    # A lone string is one prompt, not a list of one-character prompts.
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _id_set(value: int | Iterable[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)
