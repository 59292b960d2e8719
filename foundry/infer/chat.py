"""Conversations: render a chat history as a prompt and stream the model's replies through the Engine."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from foundry.core.errors import UserError
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams

PLAIN_FORMAT_NOTE = ("the tokenizer has no chat template, so the conversation is sent as plain "
                     "'User: ... / Assistant: ...' text (base models follow it only loosely)")
# In the plain format the model would happily write the user's next turn too: stop before it.
PLAIN_STOP = "\nUser:"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can render conversations itself."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Prompt text that asks for the next assistant turn, and the stop strings that format needs."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True), []
    return plain_chat(messages), [PLAIN_STOP]


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[str]]:
    """Prompt ids that ask for the next assistant turn, and the stop strings that format needs.

    Message text never becomes special tokens: a user typing `<|im_end|>` cannot forge a turn. Only the
    template's own markup is special (and it already holds any bos, so nothing is added)."""
    if has_chat_template(tokenizer):
        return tokenizer.encode_chat(messages, add_generation_prompt=True), []
    return tokenizer.encode(plain_chat(messages), split_special_tokens=True), [PLAIN_STOP]


def plain_chat(messages: list[dict[str, Any]]) -> str:
    """The fallback format: a system text, then 'User:' and 'Assistant:' lines, ending in 'Assistant:'."""
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(f"{m['content']}\n\n")
        else:
            speaker = "User" if m["role"] == "user" else "Assistant"
            lines.append(f"{speaker}: {m['content']}\n")
    return "".join(lines) + "Assistant:"


class ChatSession:
    """A conversation with one model: keeps the history, renders it and streams each reply."""

    def __init__(self, engine: Engine, system: str | None = None, params: SamplingParams | None = None):
        if engine.tokenizer is None:
            raise UserError("chat needs a tokenizer, and this model directory has no tokenizer.json")
        self.engine = engine
        self.system = system
        self.params = params or SamplingParams()
        self.messages: list[dict[str, str]] = []
        self.reset()

    @property
    def templated(self) -> bool:
        return has_chat_template(self.engine.tokenizer)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply; the reply joins the history when done."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids, stops = encode_chat(self.engine.tokenizer, messages)
        params = dataclasses.replace(self.params, stop=self.params.stop + stops)
        parts: list[str] = []
        leading = not self.templated  # the plain format's reply starts after "Assistant:", with a space
        for delta in self.engine.stream([ids], params):  # raises UserError before any output if too long
            piece = delta.text.lstrip() if leading else delta.text
            leading = leading and not piece
            if piece:
                parts.append(piece)
                yield piece
        self.messages = messages + [{"role": "assistant", "content": "".join(parts)}]
