"""From a validated request to what the engine runs: encoded prompts and sampling settings, one per choice.

Every check that can fail happens here, before the request is queued, so that errors are answered as a
4xx and never inside a 200 (stream or not)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from foundry.core.errors import UserError
from foundry.infer.chat import encode_chat, has_chat_template
from foundry.infer.constrained import Constraint, constraint_for_response_format
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams
from foundry.infer.tools import (
    chosen_functions,
    constraint_for_tool_call,
    function_schemas,
)
from foundry.serve.config import ServeConfig
from foundry.serve.errors import APIError
from foundry.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    message_dict,
    refuse_unsupported,
    stop_list,
)

MAX_PROMPTS = 64  # prompts in one /v1/completions batch
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context's rest


@dataclass
class Prepared:
    """The engine's work for one request: choice i runs prompts[i] with params[i]."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    prompt_tokens: int  # usage: each distinct prompt counted once, whatever n
    strip_leading: bool = False  # the plain chat format's reply starts with the space after "Assistant:"
    logprobs: bool = False  # report each token's log-probability (k alternatives: params[i].logprobs)
    tools: list[dict[str, Any]] | None = None  # the request's tools, to read calls out of the replies
    tool_mode: str = "none"  # "forced": every reply is one call; "auto": a reply may hold calls; "none"
    parallel_tool_calls: bool = True  # False: an "auto" reply keeps only its first call
    stop_ids: set[int] = field(default_factory=set)  # end-of-sequence ids: no logprobs entry, never text
    echo: list[str] | None = None  # completions' echo: each choice's prompt text, sent before its completion


def check_model(name: str, config: ServeConfig) -> None:
    """404 for a model this server does not serve."""
    if name != config.model_name:
        raise APIError(404, f"model {name!r} does not exist here; this server serves {config.model_name!r} "
                            "(GET /v1/models lists it)", "model_not_found", "model")


def _check_utf8(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} is not valid Unicode (a lone surrogate escape?)", "invalid_utf8", param) from None


def _budget(asked: int | None, param: str, prompt_len: int, default: int | None, engine: Engine,
            config: ServeConfig, prompt_param: str = "prompt") -> int:
    """The max_new_tokens of a choice: what was asked, checked against the flags and the context."""
    # A request must fit one KV slot (the pool exists once the backend started; see --kv-cache-memory).
    context = min(engine.config.max_position_embeddings, engine.scheduler.pool.slot_len + 1)
    if prompt_len >= context:
        raise APIError(400, f"the prompt has {prompt_len} tokens and this server's context (the model and "
                            f"--kv-cache-memory) holds {context}; shorten the prompt to at most {context - 1} tokens",
                       "context_length_exceeded", prompt_param)
    room = context - prompt_len
    if asked is None:
        return max(1, min(default or room, room, config.max_tokens))
    if asked > room:
        raise APIError(400, f"this server's context (the model and --kv-cache-memory) holds {context} tokens; "
                            f"the prompt has {prompt_len}, so {param} can be at most {room} (asked {asked})",
                       "context_length_exceeded", param)
    if asked > config.max_tokens:
        raise APIError(400, f"{param} is {asked}; this server allows at most {config.max_tokens} "
                            "(foundry serve --max-tokens)", "invalid_value", param)
    return asked


def _params(request: CompletionRequest | ChatRequest, max_new: int, stops: list[str], choice: int,
            logprobs: int | None = None, constraint: Constraint | None = None,
            prompt_logprobs: int | None = None) -> SamplingParams:
    # Choices of one request must differ when sampled: each takes its own seed, derived from the request's.
    seed = None if request.seed is None else (request.seed + choice) % 2**63
    try:
        return SamplingParams(max_new_tokens=max_new, temperature=request.temperature, top_p=request.top_p,
                              seed=seed, stop=stops, presence_penalty=request.presence_penalty,
                              frequency_penalty=request.frequency_penalty, logit_bias=dict(request.logit_bias or {}),
                              logprobs=logprobs, constraint=constraint, prompt_logprobs=prompt_logprobs)
    except UserError as exc:
        raise APIError(400, str(exc), "invalid_value") from None


def _check_logit_bias(bias: dict[str, float] | None, engine: Engine) -> None:
    """400 naming logit_bias for a key that is not a token id of this model or a value outside [-100, 100]."""
    vocab = engine.config.vocab_size
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) >= vocab:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0..{vocab - 1})",
                           "invalid_value", "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value} for token {key}",
                           "invalid_value", "logit_bias")


def _per_choice(constraint: Constraint | None, n: int) -> list[Constraint | None]:
    """One constraint per choice: each keeps its own grammar state, so none is shared (compiled once)."""
    if constraint is None:
        return [None] * n
    return [constraint] + [constraint.copy() for _ in range(n - 1)]


def _user_error(param: str, build: Any, *args: Any) -> Any:
    """build(*args), its UserError answered as a 400 naming `param`."""
    try:
        return build(*args)
    except UserError as exc:
        raise APIError(400, str(exc), "invalid_value", param) from None


def _check_common(request: CompletionRequest | ChatRequest, config: ServeConfig) -> list[str]:
    check_model(request.model, config)
    refuse_unsupported(request)
    if request.n > config.max_n:
        raise APIError(400, f"n is {request.n}; this server allows at most {config.max_n} choices "
                            "(foundry serve --max-n)", "invalid_value", "n")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options needs stream: true", "invalid_value", "stream_options")
    stops = stop_list(request.stop)
    for s in stops:
        _check_utf8(s, "stop")
    return stops


def prepare_completion(request: CompletionRequest, engine: Engine, config: ServeConfig) -> Prepared:
    """Encode and check a /v1/completions request."""
    stops = _check_common(request, config)
    _check_logit_bias(request.logit_bias, engine)
    prompt = request.prompt
    # One prompt is text or ids; a batch is a list of texts or of id lists.
    batch = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not batch:
        raise APIError(400, "prompt is empty: give text or token ids", "invalid_value", "prompt")
    if len(batch) > MAX_PROMPTS:
        raise APIError(400, f"prompt holds {len(batch)} prompts; at most {MAX_PROMPTS} a request",
                       "invalid_value", "prompt")
    if stops and engine.tokenizer is None:
        raise APIError(400, "stop strings need a tokenizer; this model has none", "invalid_value", "stop")
    if request.echo and engine.tokenizer is None:
        raise APIError(400, "echo needs a tokenizer to write the prompt as text; this model has none",
                       "invalid_value", "echo")
    prompts, params, total, echo = [], [], 0, []
    for i, p in enumerate(batch):
        if isinstance(p, str):
            _check_utf8(p, "prompt")
        try:
            ids = engine.encode(p)
        except UserError as exc:
            raise APIError(400, f"prompt {i}: {exc}", "invalid_value", "prompt") from None
        max_new = _budget(request.max_tokens, "max_tokens", len(ids), COMPLETIONS_DEFAULT_MAX_TOKENS, engine, config)
        total += len(ids)
        for j in range(request.n):
            prompts.append(ids)
            # echo with logprobs: the prompt's tokens are scored too (what lm-eval's loglikelihood reads).
            prompt_logprobs = request.logprobs if request.echo else None
            params.append(_params(request, max_new, stops, len(params), request.logprobs,
                                  prompt_logprobs=prompt_logprobs))
            if request.echo:
                echo.append(p if isinstance(p, str) else engine.tokenizer.decode(ids))
    return Prepared(prompts, params, total, logprobs=request.logprobs is not None, stop_ids=set(engine.stop_ids),
                    echo=echo if request.echo else None)


def prepare_chat(request: ChatRequest, engine: Engine, config: ServeConfig) -> Prepared:
    """Render a /v1/chat/completions conversation with the model's chat template, encode and check it."""
    stops = _check_common(request, config)
    if engine.tokenizer is None:
        raise APIError(400, "chat needs a tokenizer, and this model has none: use /v1/completions with token ids",
                       "invalid_value", "messages")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree: give one", "invalid_value", "max_tokens")
    _check_logit_bias(request.logit_bias, engine)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
    messages = [message_dict(m, i) for i, m in enumerate(request.messages)]
    for i, m in enumerate(messages):
        _check_utf8(m["content"], f"messages.{i}.content")
    tools, tool_mode, constraint = _tools(request, engine, messages)
    if request.response_format is not None:
        fmt = _user_error("response_format", constraint_for_response_format, request.response_format,
                          engine.tokenizer, engine.stop_ids)
        if fmt is not None and tool_mode == "forced":
            raise APIError(400, "response_format and a forced tool call cannot both shape the reply: drop one",
                           "invalid_value", "response_format")
        if fmt is not None:
            # A JSON reply is the answer, not a call to read out of it ("auto" then means "answer in the format").
            constraint, tool_mode = fmt, "none"
    try:
        if tools is not None or _has_tool_turns(messages):
            # Tools go to the template, which shows them to the model in the format it was trained on.
            template = engine.tokenizer.chat_template
            messages = _tools_as_text(messages, tools, template)
            ids = engine.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools)
            format_stops = []
        else:
            ids, format_stops = encode_chat(engine.tokenizer, messages)
    except UserError as exc:
        raise APIError(400, f"messages: {exc}", "invalid_value", "messages") from None
    except Exception as exc:  # noqa: BLE001 - a template that rejects this conversation (roles out of order)
        raise APIError(400, f"messages: the model's chat template refused them ({exc})", "invalid_value",
                       "messages") from None
    asked, param = request.max_completion_tokens, "max_completion_tokens"
    if asked is None:
        asked, param = request.max_tokens, "max_tokens"
    max_new = _budget(asked, param, len(ids), None, engine, config, "messages")
    k = (request.top_logprobs or 0) if request.logprobs else None
    params = [_params(request, max_new, stops + format_stops, j, k, c)
              for j, c in enumerate(_per_choice(constraint, request.n))]
    return Prepared([ids] * request.n, params, len(ids), strip_leading=not has_chat_template(engine.tokenizer),
                    logprobs=bool(request.logprobs), tools=tools, tool_mode=tool_mode,
                    parallel_tool_calls=request.parallel_tool_calls is not False, stop_ids=set(engine.stop_ids))


TOOLS_NOTE = ("You may call these functions. To call one, reply with only a JSON object "
              "{{\"name\": <function name>, \"arguments\": <its arguments>}}.\n<tools>\n{tools}\n</tools>")


def _has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "tool" or "tool_calls" in m for m in messages)


def _tools_as_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str
                   ) -> list[dict[str, Any]]:
    """Messages that show tools and past calls as text where the chat template itself would drop them.

    A template that never reads `tools` (foundry's ChatML) gets them in a system message, in the format a
    forced call is constrained to; one that never reads `tool_calls` gets past calls as <tool_call> text."""
    out = [dict(m) for m in messages]
    if "tool_calls" not in template:
        for m in out:
            for call in m.pop("tool_calls", []):
                text = json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
                                  ensure_ascii=False)
                m["content"] = (m["content"] + "\n" if m["content"] else "") + f"<tool_call>{text}</tool_call>"
    if tools and "tools" not in template:
        note = TOOLS_NOTE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{note}"
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _tools(request: ChatRequest, engine: Engine, messages: list[dict[str, Any]]
           ) -> tuple[list[dict[str, Any]] | None, str, Constraint | None]:
    """(tools for the template, how replies are read, the forced call's constraint) of a chat request."""
    uses_tools = bool(request.tools) or _has_tool_turns(messages)
    if uses_tools and not has_chat_template(engine.tokenizer):
        raise APIError(400, "tools need a chat template to show them to the model, and this model's tokenizer "
                            "has none (add chat_template to tokenizer_config.json)", "invalid_value", "tools")
    _user_error("tools", function_schemas, request.tools)
    forced = _user_error("tool_choice", chosen_functions, request.tools, request.tool_choice)
    if not request.tools:
        return None, "none", None
    constraint = _user_error("tools", constraint_for_tool_call, request.tools, request.tool_choice,
                             engine.tokenizer, engine.stop_ids)  # "auto": text, or a valid call
    if forced is None:
        return request.tools, "none" if request.tool_choice == "none" else "auto", constraint
    return request.tools, "forced", constraint
