"""Structured output by constrained decoding: a grammar (from a JSON schema) masks each next token.

llguidance does the grammar work: it compiles a JSON schema into a grammar and, at each step,
computes which token ids can extend the output so far. `Constraint` wraps one llguidance matcher
behind the three calls the engine makes per request:

    allowed = constraint.mask(vocab_size)   # before sampling: bool [vocab_size], or None
    constraint.advance(token_id)            # after sampling
    constraint.is_finished()                # the value is complete: only stop ids are allowed

Stop ids (eos, end of turn) are handled here, not by llguidance: they are allowed exactly when
the grammar accepts the output so far, and once the value can grow no further they are the only
ids allowed. Ids past the tokenizer's vocabulary (padding rows of the embedding) are never allowed.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import llguidance
import torch

from foundry.core.errors import UserError
from foundry.tokenizer import Tokenizer

# Compact-but-readable JSON, as json.dumps writes it: `{"a": 1, "b": 2}`. Fixed separators (no free
# whitespace) keep the model on the separators it saw in training, and stop a weak model from
# padding the output with endless whitespace, a common failure of flexible-whitespace grammars.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_NONZERO_TO_ONE = bytes([0] + [1] * 255)  # bytes.translate table: llguidance's 0/200 -> bool 0/1

# One llguidance tokenizer per foundry Tokenizer: building it walks the whole vocabulary.
_LL_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()


class Constraint:
    """One request's grammar state: the allowed next tokens, advanced by each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, stop_ids: Iterable[int], what: str = "the grammar"):
        self._matcher = matcher
        self._stop_ids = sorted(set(stop_ids))
        if not self._stop_ids:
            raise UserError(f"{what} needs an end-of-sequence token to stop on, and the tokenizer has none; "
                            "set eos_token in tokenizer_config.json")
        self._what = what
        self._stopped = False  # a stop id was consumed

    def mask(self, vocab_size: int) -> torch.Tensor | None:
        """Bool [vocab_size] of the ids allowed next (True = allowed); None would mean unrestricted."""
        bias = self._matcher.compute_logit_bias()  # one byte per tokenizer id: 0 forbidden, 200 allowed
        # Built as bytes and handed to torch once: per-element tensor writes would cost more than the grammar.
        allowed = bytearray(bias[:vocab_size].translate(_NONZERO_TO_ONE))
        # Stop ids follow the grammar's acceptance, whatever eos llguidance itself was told about.
        accepting = self._matcher.is_accepting() and not self._stopped
        for token_id in self._stop_ids:
            if token_id < len(allowed):
                allowed[token_id] = accepting
        allowed.extend(bytes(max(0, vocab_size - len(allowed))))  # padding rows past the tokenizer: never
        return torch.frombuffer(allowed, dtype=torch.bool)

    def advance(self, token_id: int) -> None:
        """Feed the sampled token; a token the mask forbade is a bug in the caller (RuntimeError)."""
        if self._stopped:
            raise RuntimeError(f"{self._what}: token {token_id} sampled after a stop token")
        if token_id in self._stop_ids:
            if not self._matcher.is_accepting():
                raise RuntimeError(f"{self._what}: stop token {token_id} sampled before the value was complete")
            self._stopped = True
            return
        if not self._matcher.consume_token(token_id):
            # llguidance appends its parser state to the message; the first line says what went wrong.
            raise RuntimeError(f"{self._what}: token {token_id} is not allowed here "
                               f"({self._matcher.get_error().splitlines()[0]})")

    def copy(self) -> Constraint:
        """An independent Constraint in the same state (one per choice when n > 1, compiled once)."""
        twin = Constraint(self._matcher.deep_copy(), self._stop_ids, self._what)
        twin._stopped = self._stopped
        return twin

    def is_finished(self) -> bool:
        """True once the value is complete and nothing but a stop token may follow (or one did)."""
        return self._stopped or self._matcher.is_stopped()


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance view of a foundry (byte-level BPE) tokenizer, built once per tokenizer."""
    cached = _LL_TOKENIZERS.get(tokenizer)
    if cached is None:
        # llguidance reads the same tokenizer.json we save; eos is set explicitly because Constraint
        # decides stop ids itself (llguidance would otherwise guess one from the vocabulary).
        eos = sorted(tokenizer.stop_ids) or None
        cached = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=eos)
        _LL_TOKENIZERS[tokenizer] = cached
    return cached


def constraint_for_schema(schema: Any, tokenizer: Tokenizer, what: str = "response_format json_schema",
                          stop_ids: Iterable[int] | None = None) -> Constraint:
    """A Constraint to one JSON value valid for `schema`; an invalid or unsupported schema is a UserError."""
    if not isinstance(schema, dict):
        raise UserError(f"{what}: the schema must be a JSON object, got {type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:  # not serializable as JSON
        raise UserError(f"{what}: the schema is not valid JSON ({exc})") from None
    return _constraint(grammar, tokenizer, what, "invalid JSON schema", stop_ids)


def constraint_for_grammar(lark: str, tokenizer: Tokenizer, what: str,
                           stop_ids: Iterable[int] | None = None) -> Constraint:
    """A Constraint to a grammar in llguidance's Lark syntax (which may inline JSON schemas as `%json {...}`)."""
    return _constraint(llguidance.LLMatcher.grammar_from_lark(lark), tokenizer, what, "invalid grammar", stop_ids)


def _constraint(grammar: str, tokenizer: Tokenizer, what: str, invalid: str,
                stop_ids: Iterable[int] | None) -> Constraint:
    matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
    if matcher.is_error():
        # llguidance's message names the keyword ("Invalid type: foo", "Unknown keyword: ...").
        raise UserError(f"{what}: {invalid}: {_one_line(matcher.get_error())}")
    return Constraint(matcher, tokenizer.stop_ids if stop_ids is None else stop_ids, what)


def constraint_for_response_format(response_format: dict | None, tokenizer: Tokenizer,
                                   stop_ids: Iterable[int] | None = None) -> Constraint | None:
    """The Constraint an OpenAI `response_format` asks for: None for text, any object, or a JSON schema."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise UserError("response_format must be an object like {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return constraint_for_schema({"type": "object"}, tokenizer, "response_format json_object", stop_ids)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise UserError("response_format.json_schema must be an object with \"name\" and \"schema\"")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise UserError("response_format.json_schema.name must be a non-empty string")
        if "schema" not in spec:
            raise UserError(f"response_format.json_schema {name!r} has no \"schema\"")
        # strict or not, the schema is enforced: constrained decoding costs nothing extra for it.
        return constraint_for_schema(spec["schema"], tokenizer, f"response_format json_schema {name!r}", stop_ids)
    raise UserError(f"response_format.type must be \"text\", \"json_object\" or \"json_schema\", got {kind!r}")


def _one_line(message: str) -> str:
    return " ".join(message.split())

