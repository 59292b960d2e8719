"""Tokenizer: byte-level BPE over Hugging Face `tokenizers`, in the Hugging Face directory layout.

One class serves tokenizers foundry trains and those shipped with Llama/Qwen/Mistral checkpoints:
it reads and writes `tokenizer.json` + `tokenizer_config.json`, so `transformers.AutoTokenizer`
loads what we save with identical ids, and renders chat templates the way `transformers` does.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from foundry.core.errors import UserError
from foundry.core.files import atomic_file, write_json

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
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / "tokenizer.json", "w") as handle:
            handle.write(self._backend.to_str(pretty=True))
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("added_tokens_decoder", {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._backend.get_added_tokens_decoder().items())})
        if self.chat_template is not None and not isinstance(config.get("chat_template"), list):
            config["chat_template"] = self.chat_template
        write_json(directory / "tokenizer_config.json", config)
        write_json(directory / "special_tokens_map.json",
                   {key: config[key] for key in _NAMED_SPECIALS if config.get(key) is not None})
        if (directory / "chat_template.jinja").exists() and self.chat_template is not None:
            # transformers reads this file before the config: keep the two from disagreeing.
            with atomic_file(directory / "chat_template.jinja", "w") as handle:
                handle.write(self.chat_template)

    # ---- ids ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens runs the post-processor (e.g. Llama 3's bos)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

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
        try:
            return _compile(self.chat_template).render(messages=messages,
                                                       add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as exc:
            raise UserError(f"chat template: {exc}") from None

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


def _pick_template(value: Any) -> str | None:
    """chat_template is a string or a list of {"name", "template"}; the one named "default" wins."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


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


__all__ = ["Tokenizer", "SPECIAL_TOKENS", "CHATML_TEMPLATE", "ENDOFTEXT", "IM_START", "IM_END", "PAD"]
