"""Tokenizer: byte-level BPE over Hugging Face `tokenizers`, in the Hugging Face directory layout.

One class serves tokenizers foundry trains and those shipped with Llama/Qwen/Mistral checkpoints:
it reads and writes `tokenizer.json` + `tokenizer_config.json`, so `transformers.AutoTokenizer`
loads what we save with identical ids, and renders chat templates the way `transformers` does.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from foundry.core.errors import UserError
from foundry.tokenizer import chat_template
from foundry.tokenizer import files as tokenizer_files

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD)
# Tokens other than eos that end a chat turn, so generation stops there (ChatML, Llama 3).
END_OF_TURN_TOKENS = (IM_END, "<|eot_id|>")

# Llama 3 / GPT-4 style pre-split: case-insensitive contractions, digits in groups of up to three,
# runs of whitespace and newlines kept apart from words (matters for code).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML, the default for models trained from scratch; accepts string or OpenAI-style list content.
CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' }}\n"
    "    {%- if message['content'] is string %}\n"
    "        {{- message['content'] }}\n"
    "    {%- else %}\n"
    "        {%- for part in message['content'] if part['type'] == 'text' %}\n"
    "            {{- part['text'] }}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Named special tokens that transformers hands to every chat template as variables.
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """A `tokenizers` backend plus its tokenizer_config.json: ids, special tokens and chat template."""

    def __init__(self, backend: Backend, config: dict[str, Any] | None = None,
                 chat_template: str | None = None):
        self._backend = backend
        self.config: dict[str, Any] = dict(config or {})
        self.chat_template: str | None = chat_template or _pick_template(self.config.get("chat_template"))

    # ---- making one ---------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train a byte-level BPE with foundry's special tokens and a ChatML chat template."""
        minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise UserError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {minimum} "
                            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        # Special tokens come first, so they get ids 0..3 whatever the vocabulary size.
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(texts, trainer)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,  # documents are separated by eos only, as in GPT-2 / Qwen
            "eos_token": ENDOFTEXT,
            "pad_token": PAD,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
        }
        return cls(backend, config, CHATML_TEMPLATE)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer directory (or a tokenizer.json file) in the Hugging Face layout."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        folder = file.parent
        tokenizer_files.finish_update(folder)  # a save that a crash interrupted after its commit point
        if not file.is_file():
            hint = (" (only tokenizer.json is supported, not sentencepiece tokenizer.model)"
                    if (folder / "tokenizer.model").exists() else "")
            raise UserError(f"no tokenizer at {path}: expected a directory with tokenizer.json{hint}; "
                            "train one with `foundry tokenizer train`")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # tokenizers raises plain Exception on malformed files
            raise UserError(f"cannot read tokenizer {file}: {exc}") from None
        config = _read_json(folder / "tokenizer_config.json") if file.name == "tokenizer.json" else {}
        if not any(config.get(key) for key in _NAMED_SPECIALS):
            # Legacy layout: special tokens only in special_tokens_map.json.
            for key, value in _read_json(folder / "special_tokens_map.json").items():
                config.setdefault(key, value)
        if not config and backend.token_to_id(ENDOFTEXT) is not None:
            config["eos_token"] = ENDOFTEXT  # a bare tokenizer.json of ours still knows its eos
        template = None
        if (folder / "chat_template.jinja").is_file():
            # transformers >= 4.50 saves the template beside the config, and prefers it when present.
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, config, template)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (and chat_template.jinja
        where the directory has one) as one set: a crash leaves all old or all new files (see files.py)."""
        directory = Path(directory)
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("added_tokens_decoder", {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._backend.get_added_tokens_decoder().items())})
        if self.chat_template is not None and not isinstance(config.get("chat_template"), list):
            config["chat_template"] = self.chat_template
        files: dict[str, str | None] = {
            "tokenizer.json": self._backend.to_str(pretty=True),
            "tokenizer_config.json": _json_text(config),
            "special_tokens_map.json": _json_text({key: config[key] for key in _NAMED_SPECIALS
                                                   if config.get(key) is not None}),
        }
        if (directory / "chat_template.jinja").exists():
            # transformers reads this file before the config: keep the two from disagreeing.
            files["chat_template.jinja"] = self.chat_template
        tokenizer_files.write_set(directory, files)

    # ---- ids ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens runs the post-processor (e.g. Llama 3's bos);
        split_special_tokens reads "<|...|>" as text (for text from a user, e.g. a plain-format chat)."""
        backend = self._text_only_backend if split_special_tokens else self._backend
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False,
                     split_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of many texts at once (parallel in Rust); split_special_tokens reads "<|...|>" as text."""
        # Raw pretraining text needs split_special_tokens: a document quoting "<|endoftext|>" must not
        # forge a document boundary.
        backend = self._text_only_backend if split_special_tokens else self._backend
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: faster
        return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte-level tokenizers round-trip any text exactly."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (special or not), or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or None when out of range."""
        return self._backend.id_to_token(token_id)

    @cached_property
    def _text_only_backend(self) -> Backend:
        backend = Backend.from_str(self._backend.to_str())
        backend.encode_special_tokens = True
        return backend

    @property
    def backend(self) -> Backend:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    # ---- properties ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table needs at least this many rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def special_token(self, name: str) -> str | None:
        """String of a named special token ("bos_token", "eos_token", ...) from the config."""
        return _token_text(self.config.get(name))

    @property
    def bos_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: eos plus end-of-turn tokens present in the vocabulary."""
        ids = {self.eos_id, *(self.token_to_id(t) for t in END_OF_TURN_TOKENS)}
        return {i for i in ids if i is not None}

    def _named_id(self, name: str) -> int | None:
        token = self.special_token(name)
        return None if token is None else self.token_to_id(token)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json: equal fingerprints mean equal ids for every text."""
        canonical = json.dumps(json.loads(self._backend.to_str()), sort_keys=True, ensure_ascii=False,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ---- chat ---------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            **variables: Any) -> str:
        """Render a conversation with the chat template, as transformers' apply_chat_template(tokenize=False)."""
        messages, context = self._chat_inputs(messages, variables)
        return chat_template.render(self.chat_template, messages, add_generation_prompt, context)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                    **variables: Any) -> list[int]:
        """Ids of the rendered conversation in which only the template's markup becomes special tokens.

        The text is apply_chat_template's; a special token's text inside a message (`<|im_end|>` typed by
        a user) is encoded as plain text, so no message can forge a turn. Without such text the ids are
        exactly those of encoding the rendered text (transformers' apply_chat_template(tokenize=True)).
        A special token's text in a role, a name, a tool call or a tool definition is refused."""
        messages, context = self._chat_inputs(messages, variables)
        specials = self._special_tokens
        fields = chat_template.non_text_fields(messages)
        # tools, documents and the like come from the caller's user as much as messages do.
        caller = {key: value for key, value in variables.items() if key not in _NAMED_SPECIALS}
        for where, value in (*fields, *chat_template.other_strings(caller, "variables")):
            found = _special_in(value, specials)
            if found:
                raise UserError(f"chat {where} contains the special token {found!r}; only message text may "
                                "hold special-token text (it is encoded as plain text)")
        text = chat_template.render(self.chat_template, messages, add_generation_prompt, context)
        encoding = self._backend.encode(text, add_special_tokens=False)
        marked = chat_template.mark_messages(messages)
        spans = None if marked is None else chat_template.content_spans(
            chat_template.render(self.chat_template, marked, add_generation_prompt, context), text)
        if spans is None:
            # The template changed message text on its way out (or a text holds a sentinel): its place in
            # the rendered text is unknown, so message text must be free of special tokens to be safe.
            for message_text in chat_template.message_texts(messages):
                found = _special_in(message_text, specials)
                if found:
                    raise UserError(f"a message contains the special token {found!r}, which cannot be kept plain "
                                    "text here (this chat template rewrites message text, or the message holds "
                                    "U+FDD0/U+FDD1); remove it")
            return encoding.ids
        markup, forged = [], False
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id in specials:
                # The offsets of an lstrip/rstrip token include the whitespace it eats: find its own text.
                own = text.find(specials[token_id], start, max(end, start + len(specials[token_id])))
                if own >= 0:
                    start, end = own, own + len(specials[token_id])
                if chat_template.overlaps(start, end, spans):
                    forged = True
                else:
                    markup.append((start, end, token_id))
        return self._encode_markup_only(text, markup) if forged else encoding.ids

    def _chat_inputs(self, messages: list[dict[str, Any]], variables: dict[str, Any]
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if self.chat_template is None:
            raise UserError("this tokenizer has no chat template; add one to tokenizer_config.json")
        if not messages:
            raise UserError("cannot apply the chat template to an empty conversation")
        # transformers drops None-valued keys: templates test for a missing key, not for None.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context: dict[str, Any] = {key: self.special_token(key) for key in _NAMED_SPECIALS
                                   if self.special_token(key) is not None}
        context.update(variables)
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        return messages, context

    def _encode_markup_only(self, text: str, markup: list[tuple[int, int, int]]) -> list[int]:
        """Encode `text` with only the special tokens at `markup` ((start, end, id) spans) read as specials.

        Each markup token is swapped for its stand-in, a non-special added token of a copy of the backend
        that reads every special token as text; the copy splits the text exactly where the original does,
        so the pieces in between tokenize as they would in a plain encode."""
        backend, stand_ins = self._markup_backend
        used = set(stand_ins.values())
        if any(ch in used for ch in text):
            raise UserError("a message contains a private-use character (plane 16) that foundry reserves "
                            "for encoding chat turns; remove it")
        pieces, position = [], 0
        for start, end, token_id in markup:
            pieces += [text[position:start], stand_ins[token_id]]
            position = end
        pieces.append(text[position:])
        back = {backend.token_to_id(ch): token_id for token_id, ch in stand_ins.items()}
        return [back.get(i, i) for i in backend.encode("".join(pieces), add_special_tokens=False).ids]

    @cached_property
    def _special_tokens(self) -> dict[int, str]:
        """id -> text of the vocabulary's special added tokens (those split_special_tokens reads as text)."""
        return {i: t.content for i, t in self._backend.get_added_tokens_decoder().items() if t.special}

    @cached_property
    def _markup_backend(self) -> tuple[Backend, dict[int, str]]:
        backend = Backend.from_str(self._backend.to_str())
        backend.encode_special_tokens = True
        decoder = self._backend.get_added_tokens_decoder()
        stand_ins = {i: chr(chat_template.PLACEHOLDER_BASE + k) for k, i in enumerate(sorted(self._special_tokens))}
        backend.add_tokens([AddedToken(stand_ins[i], special=False, normalized=False, lstrip=decoder[i].lstrip,
                                       rstrip=decoder[i].rstrip, single_word=decoder[i].single_word)
                            for i in sorted(stand_ins)])
        return backend, stand_ins

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.special_token('eos_token')!r})"


# ---- helpers ------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _json_text(data: Any) -> str:
    # As foundry.core.files.write_json lays JSON out.
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _special_in(text: str, specials: dict[int, str]) -> str | None:
    """The first special token whose text occurs in `text`, if any."""
    return next((token for token in specials.values() if token in text), None)


def _pick_template(value: Any) -> str | None:
    """chat_template is a string or a list of {"name", "template"}; the one named "default" wins."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


__all__ = ["Tokenizer", "SPECIAL_TOKENS", "CHATML_TEMPLATE", "ENDOFTEXT", "IM_START", "IM_END", "PAD"]
