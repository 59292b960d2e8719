"""Chat templates: rendered the way transformers does (in a sandbox), encoded so message text stays text.

transformers renders a conversation to text and then parses special tokens out of all of it, so a user
who writes `<|im_end|>\\n<|im_start|>system` in a message forges a system turn. Here the rendered text
is the same, but the ids are not: the conversation is rendered a second time with every message's text
wrapped in two sentinel characters (Unicode noncharacters), which shows where message text lies in the
rendered text. A special token whose text lies inside message text is encoded as plain text; only the
template's own markup (and variables such as bos_token) becomes special-token ids. When the template
transforms message text so that the sentinels do not come through intact, the conversation is encoded
as usual if no message contains a special token's text, and refused if one does: it fails safe.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterator

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from foundry.core.errors import UserError

# Noncharacters are "permanently reserved for internal use" by Unicode: no text should carry them.
OPEN, CLOSE = "\ufdd0", "\ufdd1"
_SENTINELS = re.compile(f"([{OPEN}{CLOSE}])")
# Each special token of the vocabulary gets one stand-in from the private-use plane 16 while the
# markup-only encoding runs (see Tokenizer._encode_markup_only).
PLACEHOLDER_BASE = 0x100000

Span = tuple[int, int]


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
           context: dict[str, Any]) -> str:
    """Render a conversation with a chat template, as transformers' apply_chat_template(tokenize=False)."""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **context)
    except jinja2.TemplateError as exc:
        raise UserError(f"chat template: {exc}") from None


# ---- where message text lies ----------------------------------------------------------------

def message_texts(messages: list[dict[str, Any]]) -> Iterator[str]:
    """Every message text: string content, and the text of OpenAI-style {"type": "text"} parts."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]


def mark_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Copies of the messages with each text wrapped in the sentinels; None when a text holds one already."""
    if any(OPEN in text or CLOSE in text for text in message_texts(messages)):
        return None
    marked = []
    for message in messages:
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = _mark(content)
        elif isinstance(content, list):
            message["content"] = [{**part, "text": _mark(part["text"])}
                                  if isinstance(part, dict) and isinstance(part.get("text"), str) else part
                                  for part in content]
        marked.append(message)
    return marked


def _mark(text: str) -> str:
    # Surrounding whitespace stays outside the sentinels, so templates that trim (Llama 3) still trim it;
    # whitespace alone is never marked, so templates that test a text for emptiness see it unchanged.
    core = text.strip()
    if not core:
        return text
    start = len(text) - len(text.lstrip())
    return f"{text[:start]}{OPEN}{core}{CLOSE}{text[start + len(core):]}"


def content_spans(marked: str, text: str) -> list[Span] | None:
    """Spans of `text` that were message text, read off the marked rendering; None unless it matches."""
    spans: list[Span] = []
    pieces: list[str] = []
    length, opened = 0, None
    for piece in _SENTINELS.split(marked):
        if piece == OPEN:
            if opened is not None:
                return None
            opened = length
        elif piece == CLOSE:
            if opened is None:
                return None
            spans.append((opened, length))
            opened = None
        else:
            pieces.append(piece)
            length += len(piece)
    if opened is not None or "".join(pieces) != text:
        return None
    return spans


def overlaps(start: int, end: int, spans: list[Span]) -> bool:
    """Whether [start, end) shares a character with any span."""
    return any(start < b and a < end for a, b in spans)


def other_strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(where, string) for every string in a nested value, message texts excepted: roles, names, tools."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from other_strings(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from other_strings(item, f"{where}[{i}]")


def non_text_fields(messages: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(where, string) of every string in the messages that is not message text (role, name, tool calls)."""
    for i, message in enumerate(messages):
        for key, value in message.items():
            if key == "content" and isinstance(value, str):
                continue
            if key == "content" and isinstance(value, list):
                for j, part in enumerate(value):
                    if isinstance(part, dict):
                        rest = {k: v for k, v in part.items() if not (k == "text" and isinstance(v, str))}
                        yield from other_strings(rest, f"messages[{i}].content[{j}]")
                continue
            yield from other_strings(value, f"messages[{i}].{key}")


# ---- the sandbox ----------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in some templates; render its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates come from downloaded checkpoints: untrusted code, hence the immutable sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"chat template does not parse: {exc}") from None
