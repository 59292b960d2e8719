"""Instruction (SFT) examples: conversations from JSONL, encoded with labels on the assistant turns only.

A record is `{"messages": [...]}` (OpenAI chat format: system / user / assistant turns, assistant
`tool_calls`, `tool` results) or `{"prompt": str, "completion": str}` (a user turn and an assistant turn).
The conversation goes through the tokenizer's chat path (`encode_chat`), so special-token text typed inside
a message stays text. Assistant spans are found by rendering prefixes: the conversation up to an assistant
turn with the generation prompt is a prefix of the conversation through that turn, and the difference is
the turn, with the template's end-of-turn token (ChatML's `<|im_end|>`), which is trained so the model learns
to stop. Without a chat template, a user + assistant pair is encoded as plain prompt + completion + eos.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundry.core.errors import UserError
from foundry.data.jsonl import Record, read_jsonl
from foundry.tokenizer import Tokenizer

IGNORE = -100  # the label of a token that is not trained (PyTorch's cross-entropy ignore_index)
# How show_example marks what is trained.
TRAIN_OPEN, TRAIN_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧


@dataclass
class Example:
    """One encoded example: token ids and per-token labels (the id where trained, IGNORE elsewhere)."""

    ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        """Number of trained tokens."""
        return sum(label != IGNORE for label in self.labels)


@dataclass
class Examples:
    """The examples of a JSONL file, and the bad lines skipped (as `path:line: why`)."""

    examples: list[Example]
    skipped: list[str] = field(default_factory=list)
    conversations: list[list[dict[str, Any]]] = field(default_factory=list)  # each example's messages

    def __len__(self) -> int:
        return len(self.examples)


# ---- records -------------------------------------------------------------------------------

def record_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation of an SFT record (either form), checked; UserError says what is wrong."""
    if "messages" in data:
        if "prompt" in data or "completion" in data:
            raise UserError("a record has both \"messages\" and \"prompt\"/\"completion\"; give one form")
        messages = data["messages"]
        check_messages(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError("the conversation has no assistant turn, so there is nothing to train on; "
                            "add one or drop the line")
        return messages
    if "prompt" in data or "completion" in data:
        prompt, completion = data.get("prompt"), data.get("completion")
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise UserError(f"\"{name}\" must be a string, got {_type_name(value)}")
        if not completion:
            raise UserError("\"completion\" is empty, so there is nothing to train on")
        return prompt_completion_messages(prompt, completion)
    raise UserError("expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}, "
                    f"got keys {sorted(data)}")


def prompt_completion_messages(prompt: str, completion: str) -> list[dict[str, Any]]:
    """A prompt and its completion as a user turn and an assistant turn."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def check_messages(messages: Any, name: str = "messages") -> None:
    """Refuse (UserError) anything but a non-empty list of OpenAI-style chat messages."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"\"{name}\" must be a non-empty list of messages, got {_type_name(messages)}")
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise UserError(f"{where} must be an object with \"role\" and \"content\", got {_type_name(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise UserError(f"{where}.role must be a string such as \"user\" or \"assistant\", got {role!r}")
        content, tool_calls = message.get("content"), message.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant":
                raise UserError(f"{where}: only assistant messages carry tool_calls, not {role!r} ones")
            if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
                raise UserError(f"{where}.tool_calls must be a list of objects")
        if content is None:
            if tool_calls is None:
                raise UserError(f"{where} has no \"content\"")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise UserError(f"{where}.content[{j}] must be an object with a \"type\" (e.g. \"text\")")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise UserError(f"{where}.content[{j}].text must be a string")
        elif not isinstance(content, str):
            raise UserError(f"{where}.content must be a string or a list of parts, got {_type_name(content)}")


def check_record(record: Record) -> None:
    """read_jsonl's `check` for SFT records: the record's form and types (UserError names file:line)."""
    try:
        record_messages(record.data)
    except UserError as exc:
        raise UserError(f"{record.where}: {exc}") from None


def load_examples(path: str | Path, tokenizer: Tokenizer, skip_bad_lines: bool = False,
                  train_on_prompt: bool = False) -> Examples:
    """Read and encode an SFT JSONL file; a line that cannot be encoded is a bad line like a malformed one."""
    encoded: dict[int, tuple[list[dict[str, Any]], Example]] = {}

    def check(record: Record) -> None:
        try:
            messages = record_messages(record.data)
            encoded[record.line] = messages, encode_example(tokenizer, messages, train_on_prompt)
        except UserError as exc:
            raise UserError(f"{record.where}: {exc}") from None

    records = read_jsonl(path, skip_bad_lines, check)
    return Examples([encoded[r.line][1] for r in records], list(records.skipped),
                    [encoded[r.line][0] for r in records])


# ---- encoding ------------------------------------------------------------------------------

def encode_example(tokenizer: Tokenizer, messages: list[dict[str, Any]], train_on_prompt: bool = False) -> Example:
    """Ids and labels of a conversation: every assistant turn (with its end-of-turn token) trained, or
    everything with train_on_prompt."""
    ids, spans = assistant_spans(tokenizer, messages)
    if train_on_prompt:
        return Example(ids, list(ids))
    return Example(ids, labels_for(ids, spans))


def labels_for(ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Labels that train the tokens inside `spans` ([start, end) token ranges) and nothing else."""
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return labels


def assistant_spans(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's ids and one [start, end) token span per assistant turn, its end-of-turn included."""
    if tokenizer.chat_template is None:
        return _plain_spans(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if turns and turns[0] == 0:
        raise UserError("the conversation starts with an assistant turn; put a user (or system) turn before it")
    ids = tokenizer.encode_chat(messages)
    stops = tokenizer.stop_ids
    spans = []
    for i in turns:
        before = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
        through = tokenizer.encode_chat(messages[:i + 1])
        start, end = _common_prefix(before, ids), _common_prefix(through, ids)
        if start < len(before) or end < len(through) or end <= start:
            # A BPE merge across a turn boundary changes the ids, not the text: only a template whose text
            # is not prefix-stable leaves the spans unknown.
            _check_prefix_stable(tokenizer, messages, i)
            if end <= start:
                raise UserError(f"message {i} (assistant) renders to no tokens of its own; give it content")
        # Train through the first end-of-turn token, not the separator the template writes after it.
        stop = next((j for j in range(start, end) if ids[j] in stops), None)
        spans.append((start, end if stop is None else stop + 1))
    return ids, spans


def _plain_spans(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> tuple[list[int], list[tuple[int, int]]]:
    roles = [m.get("role") for m in messages]
    if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in messages):
        raise UserError("this tokenizer has no chat template, so only prompt/completion records (one user turn "
                        "and one assistant turn of text) can be encoded; add a chat template to the tokenizer")
    if tokenizer.eos_id is None:
        raise UserError("this tokenizer has neither a chat template nor an eos token, so a completion cannot be "
                        "ended; set eos_token in tokenizer_config.json")
    prompt = tokenizer.encode(messages[0]["content"], add_special_tokens=True, split_special_tokens=True)
    completion = tokenizer.encode(messages[1]["content"], split_special_tokens=True) + [tokenizer.eos_id]
    return prompt + completion, [(len(prompt), len(prompt) + len(completion))]


def _check_prefix_stable(tokenizer: Tokenizer, messages: list[dict[str, Any]], turn: int) -> None:
    before = tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True)
    through = tokenizer.apply_chat_template(messages[:turn + 1])
    whole = tokenizer.apply_chat_template(messages)
    if not (through.startswith(before) and whole.startswith(through) and len(through) > len(before)):
        raise UserError(f"the chat template of this tokenizer cannot mark assistant spans; rendering the "
                        f"conversation up to message {turn} with the generation prompt is not a prefix of "
                        "rendering it through that message (the template renders turns differently by "
                        "position); use a prefix-stable template or train on everything (--train-on-prompt)")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ---- checking what is trained ----------------------------------------------------------------

def trained_runs(example: Example) -> list[tuple[int, int]]:
    """The [start, end) runs of consecutive trained tokens."""
    runs, start = [], None
    for i, label in enumerate([*example.labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_alignment(tokenizer: Tokenizer, messages: list[dict[str, Any]], example: Example) -> list[str]:
    """Problems with what an example trains (none: the trained tokens decode exactly to the assistant texts,
    each followed by its end-of-turn token). An example that trains everything has none."""
    if example.labels == example.ids:
        return []
    problems = []
    if any(label not in (IGNORE, token) for token, label in zip(example.ids, example.labels)):
        problems.append("some labels are neither the token's own id nor ignored")
    assistants = [m for m in messages if m.get("role") == "assistant"]
    runs = trained_runs(example)
    if len(runs) != len(assistants):
        problems.append(f"{len(runs)} trained span(s) for {len(assistants)} assistant turn(s)")
    # A turn may end with a special token that is not a stop id (Gemma's <end_of_turn>).
    ends = tokenizer.stop_ids | {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    for k, ((start, end), message) in enumerate(zip(runs, assistants)):
        text = tokenizer.decode(example.ids[start:end])
        last = example.ids[end - 1]
        if last not in ends:
            problems.append(f"assistant turn {k + 1}: the trained tokens {text!r} do not end with an "
                            "end-of-turn token, so the model would not learn to stop")
            continue
        body = tokenizer.decode(example.ids[start:end - 1])
        content = "".join(_texts(message))
        if message.get("tool_calls"):
            ok = content.strip() in body
        else:
            ok = body == content or body.strip() == content.strip()
        if not ok:
            problems.append(f"assistant turn {k + 1}: the trained tokens decode to {text!r}, expected "
                            f"{content!r} + {tokenizer.decode([last])!r}")
    return problems


def show_example(tokenizer: Tokenizer, messages: list[dict[str, Any]], train_on_prompt: bool = False) -> str:
    """Text lines for `--show-example`: the rendered example with trained tokens between ⟦ and ⟧, then the
    alignment check (UserError when the trained tokens are not the assistant turns)."""
    example = encode_example(tokenizer, messages, train_on_prompt)
    pieces, start = [], 0
    for a, b in trained_runs(example):
        pieces += [tokenizer.decode(example.ids[start:a]), TRAIN_OPEN, tokenizer.decode(example.ids[a:b]), TRAIN_CLOSE]
        start = b
    pieces.append(tokenizer.decode(example.ids[start:]))
    problems = check_alignment(tokenizer, messages, example)
    if problems:
        raise UserError(f"the trained tokens of this example are not its assistant turns: {problems[0]}; this "
                        "chat template rewrites assistant text, so train on everything (--train-on-prompt) or "
                        "use another template")
    turns = sum(m.get("role") == "assistant" for m in messages)
    what = ("everything (train on prompt)" if train_on_prompt
            else f"the {turns} assistant turn(s), each with its end-of-turn token")
    return "\n".join([
        f"example: {len(example.ids)} tokens, {example.trained} trained (between {TRAIN_OPEN} and {TRAIN_CLOSE})",
        "".join(pieces),
        f"check: the trained tokens decode exactly to {what}: ok",
    ])


def _texts(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


__all__ = ["IGNORE", "Example", "Examples", "record_messages", "prompt_completion_messages", "check_messages",
           "check_record", "load_examples", "encode_example", "labels_for", "assistant_spans", "trained_runs",
           "check_alignment", "show_example"]
