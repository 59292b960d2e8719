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
from foundry.infer.speculative import SpeculationStats, SpeculativeConfig
from foundry.model import Transformer
from foundry.model.weight_only import quantize_model
from foundry.model.rope import long_context_threshold

Prompt = str | Sequence[int]


class Engine:
    """Generates text from a Transformer through one Scheduler: continuous batching over one persistent KV pool."""

    def __init__(self, model: Transformer, tokenizer: Any = None, device: str | torch.device = "cpu",
                 generation_config: dict[str, Any] | None = None, max_batch_size: int = 64,
                 compile: bool = False, prepack: bool = False, kv_cache_memory: int | None = None,
                 prefill_chunk: int = 256, prefix_caching: bool = True,
                 speculative: SpeculativeConfig | None = None, draft: Transformer | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()  # note: a training loop must call .train() again after
        self.config = model.config
        self.dtype = next(model.parameters()).dtype  # of the KV cache
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or {})
        self.max_batch_size = max_batch_size
        # compile: the decode step becomes two compiled programs for every batch size and length
        # (infer/compiled.py): tens of seconds to compile on two cores the first time, then loaded from disk.
        # prepack: swap large fp32 linears for oneDNN-packed ones (CPU). It changes the model in place,
        # so it is off for a model handed in (it may still be training) and on in Engine.load.
        if compile and self.config.num_experts:
            raise UserError("--compile: the compiled decode step does not cover mixture-of-experts models yet (which "
                            "experts run depends on the tokens, so the step's shapes do); run without it")
        self.prepacked = prepack and not compile and can_prepack(self.model, self.device)
        if self.prepacked:
            prepack_linears(self.model)
        self.compiled_step = compile_step(self._logits, self.model, self.device) if compile else None
        self._decode = self.compiled_step or self._logits
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
        # speculative: greedy rows draft tokens (n-gram lookup, or `draft`, a smaller model with the same
        # vocabulary) that the model verifies in one call (infer/speculative.py). A draft alone means "draft".
        self.speculative, self.draft = self._speculation(speculative, draft)
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

    def _speculation(self, config: SpeculativeConfig | None, draft: Transformer | None
                     ) -> tuple[SpeculativeConfig | None, Transformer | None]:
        """The checked speculative settings and the draft model, moved beside the model."""
        if draft is not None and config is None:
            config = SpeculativeConfig(method="draft")
        if config is None:
            return None, None
        if config.method == "draft" and draft is None:
            raise UserError("speculative method 'draft' needs a draft model: give one (--draft MODEL) or use ngram")
        if config.method != "draft":
            if draft is not None:
                raise UserError(f"a draft model was given with speculative method {config.method!r}: "
                                "use method 'draft', or drop the draft")
            return config, None
        if draft.config.vocab_size != self.config.vocab_size:
            raise UserError(f"the draft model's vocabulary ({draft.config.vocab_size} ids) differs from the "
                            f"model's ({self.config.vocab_size}): give a draft with the same tokenizer")
        draft = draft.to(self.device).eval()  # in its own dtype (Engine.load gives it the model's)
        if self.prepacked and can_prepack(draft, self.device):
            prepack_linears(draft)
        return config, draft

    @classmethod
    def load(cls, spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             prepack: bool = True, draft: str | Path | None = None, quantize: str | None = None,
             group_size: int | None = None, **kwargs: Any) -> "Engine":
        """An engine for a model directory, or a run directory's newest checkpoint (the engine owns its model).

        draft: a smaller model directory for speculative decoding, loaded on the same device in the model's
        dtype; its tokenizer must give the same ids as the model's.
        quantize: "int8" or "int4" quantises the model's linears on loading (weight-only; model/weight_only.py),
        int4 in groups of `group_size` inputs; the draft stays as it is stored."""
        from foundry import hub  # hub reads files; the engine itself only needs a model

        loaded = hub.load(spec, device=device, dtype=dtype)
        if quantize is not None:
            quantize_model(loaded.model, quantize, group_size)
        draft_model = None
        if draft is not None:
            drafted = hub.load(draft, device=device, dtype=next(loaded.model.parameters()).dtype)
            _check_same_vocab(loaded.tokenizer, drafted.tokenizer, draft)
            draft_model = drafted.model
        return cls(loaded.model, loaded.tokenizer, device, loaded.generation_config, prepack=prepack,
                   draft=draft_model, **kwargs)

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
        """Run decode steps at batch 1 and 2 now, so that a compiled engine builds (or loads) its programs here
        rather than inside the first requests; the KV pool is then started afresh."""
        greedy = SamplingParams(temperature=0.0, max_new_tokens=3)
        stop_ids, self.stop_ids = self.stop_ids, set()  # an eos must not end a warm-up row before it decodes
        try:
            self.generate([[0]], greedy)  # batch 1
            self.generate([[1], [2]], greedy)  # every larger batch
            if self.speculative is not None and self.compiled_step is not None:
                self.compiled_step.prepare(["span-one", "span-many"], self.scheduler.pool)  # verification's
        finally:
            self.stop_ids = stop_ids
            self._scheduler = None

    @property
    def scheduler(self) -> Scheduler:
        """The engine's one scheduler and KV pool (allocated at first use, then kept)."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self, self.kv_cache_memory, self.prefill_chunk, self.prefix_caching)
        return self._scheduler

    @property
    def spec_stats(self) -> SpeculationStats | None:
        """Speculative decoding's counters so far; None when the engine does not speculate or has not run yet.

        Safe from any thread: it never creates the scheduler (the serving thread owns that)."""
        scheduler = self._scheduler
        return scheduler.spec_stats if scheduler is not None else None

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


def _check_same_vocab(tokenizer: Any, draft_tokenizer: Any, draft: str | Path) -> None:
    """UserError unless both tokenizers (where both have one) map every token to the same id."""
    if tokenizer is None or draft_tokenizer is None:
        return
    if tokenizer.backend.get_vocab(with_added_tokens=True) != draft_tokenizer.backend.get_vocab(with_added_tokens=True):
        raise UserError(f"draft model {str(draft)!r} has another tokenizer than the model (different token ids): "
                        "give a draft of the same model family")


def _listed(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    # A lone string is one prompt, not a list of one-character prompts.
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _id_set(value: int | Iterable[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)
