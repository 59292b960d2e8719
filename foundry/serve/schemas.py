"""Request bodies of the OpenAI API as pydantic models (strict types, unknown fields refused).

Fields OpenAI has and this server does not honour are declared, so that a request using them gets a 400
saying so instead of being silently ignored; their neutral values (null, false, 0, "none") are accepted."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from foundry.infer.sampling import MAX_LOGPROBS
from foundry.serve.errors import APIError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100], checked in prepare


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # report the k most likely tokens at each step
    echo: bool | None = None  # the prompt's text comes back before the completion
    suffix: Any = None
    best_of: Any = None


class TextPart(_Strict):
    type: str
    text: str | None = None
    model_config = ConfigDict(extra="allow", strict=True)  # image parts carry other keys: refused by type


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None  # checked by the constraint builder
    tools: list[dict[str, Any]] | None = None  # checked by foundry.infer.tools
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # a forced call is one call; "auto" takes what the model wrote
    functions: Any = None
    function_call: Any = None
    store: Any = None
    metadata: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None


_NEUTRAL: dict[str, tuple] = {
    "suffix": (None, ""), "best_of": (None, 1),
    "functions": (None, []), "function_call": (None, "none"), "store": (None, False), "metadata": (None, {}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
}
_WHY = {"suffix": "insertion (suffix) is not supported: send the text before the gap as the prompt",
        "best_of": "best_of is not supported: ask for n choices and pick among them",
        "functions": "functions are replaced by tools: send tools and tool_choice",
        "function_call": "functions are replaced by tools: send tools and tool_choice"}


def refuse_unsupported(request: CompletionRequest | ChatRequest) -> None:
    """Raise a 400 naming the first field set to something this server does not do yet."""
    for name, neutral in _NEUTRAL.items():
        if name in type(request).model_fields:
            value = getattr(request, name)
            if not any(value == v and type(value) is type(v) for v in neutral) and value is not None:
                why = _WHY.get(name, f"{name} is not supported yet")
                raise APIError(400, f"{why} (got {name}={value!r:.80})", "unsupported_parameter", name)


def stop_list(stop: str | list[str] | None) -> list[str]:
    """The request's stop strings as a list (at most 4, none empty, as OpenAI's API allows)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise APIError(400, f"stop holds {len(stops)} strings; at most 4 are allowed", "invalid_value", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", "invalid_value", "stop")
    return stops


def message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    """A chat message as the template's dict: text parts joined, tool calls with their arguments parsed."""
    param = f"messages.{index}"
    if message.role not in ("system", "developer", "user", "assistant", "tool"):
        why = "functions are replaced by tools: send a \"tool\" message" if message.role == "function" \
            else "roles are system, developer, user, assistant and tool"
        raise APIError(400, f"{param}.role {message.role!r}: {why}", "invalid_value", f"{param}.role")
    if message.tool_calls and message.role != "assistant":
        raise APIError(400, f"{param}: only assistant messages carry tool_calls", "invalid_value",
                       f"{param}.tool_calls")
    if message.role == "tool" and not message.tool_call_id:
        raise APIError(400, f"{param}: a tool message needs the tool_call_id it answers", "invalid_value",
                       f"{param}.tool_call_id")
    content = message.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise APIError(400, f"{param}.content.{j}: only text parts are supported, got {part.type!r}",
                               "unsupported_parameter", f"{param}.content")
        content = "".join(part.text or "" for part in content)
    role = "system" if message.role == "developer" else message.role  # templates know no "developer"
    out: dict[str, Any] = {"role": role, "content": content or ""}
    if message.tool_calls:
        # Templates (Qwen, Llama, Hermes) expect the arguments as a mapping, as transformers documents.
        calls = []
        for j, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                raise APIError(400, f"{param}.tool_calls.{j}.function.arguments is not valid JSON",
                               "invalid_value", f"{param}.tool_calls") from None
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name and message.role == "tool":  # some templates name the function a result comes from
        out["name"] = message.name
    return out


Endpoint = Literal["completions", "chat"]
