"""An lm-eval (EleutherAI's evaluation harness) model backed by a foundry Transformer.

Log-likelihoods come from the model's own forward (foundry.eval.scoring.score_continuations) and follow
lm-eval's `hf` backend exactly: a context and continuation are encoded whole and split (TemplateLM's
_encode_pair), an empty context is the prefix token (bos, else eos), inputs longer than max_length are cut
from the left, and rolling log-likelihoods use lm-eval's own disjoint rolling windows. Generation is not
done here: `generate_until` calls the injected `generate` (the CLI passes foundry's inference Engine).

lm-eval is an optional extra (`pip install 'foundry[eval]'`): import this module only when it is wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from foundry.core.errors import UserError
from foundry.eval.scoring import model_device, score_continuations
from foundry.model import Transformer

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say
# generate(prompts, until, max_gen_toks) -> texts. A prompt is text, or token ids where it had to be
# left-truncated to leave room for max_gen_toks within max_length.
Generate = Callable[[list["str | list[int]"], list[list[str]], list[int]], list[str]]


class FoundryLM(TemplateLM):
    """lm-eval's LM interface over a foundry Transformer and its Tokenizer."""

    def __init__(self, model: Transformer, tokenizer: Any, generate: Generate | None = None, batch_size: int = 8,
                 max_length: int | None = None):
        super().__init__()
        if tokenizer is None:
            raise UserError("lm-eval needs the model's tokenizer: the model directory has no tokenizer.json")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._generate = generate
        self._batch_size = batch_size
        self._max_length = max_length or model.config.max_position_embeddings
        self._device = model_device(model)

    # ---- what lm-eval asks of a model --------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        if eos is None:
            eos = self.model.config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None:
            raise UserError("the model has no eos token (tokenizer or config.json): lm-eval needs one")
        return eos

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"foundry-{self.tokenizer.fingerprint[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids as lm-eval's `hf` backend makes them: special tokens added (e.g. bos) unless told not to,
        or the text already starts with the prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = not has_bos_prefix(string, self.tok_decode([self.prefix_token_id]))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as text through the tokenizer's chat template."""
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        sequences = []
        for _, context, continuation in requests:
            if not continuation:
                raise UserError("lm-eval asked for the log-likelihood of an empty continuation")
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                                f"{self.max_length}")
            # As lm-eval's hf backend: keep the last max_length + 1 tokens (inputs are all but the last).
            sequences.append(((context + continuation)[-(self.max_length + 1):], len(continuation)))
        results = score_continuations(self.model, sequences, self.batch_size)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihoods over lm-eval's rolling windows (each token scored once)."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                       prefix_token=self.prefix_token_id,
                                                       max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations through the injected `generate`, cut at the first stop string (eos text included)."""
        if self._generate is None:
            raise UserError("this task generates text, and this FoundryLM was made without a `generate` "
                            "(use `foundry lm-eval`, which passes foundry's inference engine)")
        if not requests:
            return []
        eos = self.tok_decode([self.eot_token_id])
        prompts: list[str | list[int]] = []
        untils: list[list[str]] = []
        budgets: list[int] = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_gen_toks = int(kwargs["max_gen_toks"])
            room = self.max_length - max_gen_toks
            if room < 1:
                raise UserError(f"a task asks for {max_gen_toks} new tokens, more than max_length "
                                f"{self.max_length} leaves room for")
            ids = self.tok_encode(context)
            prompts.append(ids[-room:] if len(ids) > room else context)
            untils.append(until)
            budgets.append(max_gen_toks)
        texts = self._generate(prompts, untils, budgets)
        out = []
        for req, text, until in zip(requests, texts, untils):
            text = postprocess_generated_text(text, until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "model_architecture": self.model.config.architecture}
