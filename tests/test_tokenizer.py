"""foundry.tokenizer on its own: training, round trips, files, special tokens, chat templates."""

import json

import pytest
import torch

from foundry.core.errors import UserError
from foundry.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, Tokenizer

TEXTS = [
    "plain ascii text, with punctuation!",
    "  leading, trailing and  double  spaces  ",
    "tabs\tand\t\ttabs, newlines\n\n\n and CRLF\r\n",
    "unicode: naïve café, 日本語, 한국어, русский, e\u0301 (decomposed)",
    "emoji 🤖🚀👍🏽 and a family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # 1234567\n",
    "",
    " ",
    "\x00 control \x07 bytes \ufffd",
]


def test_train_round_trips_any_text(tiny_tokenizer):
    for text in TEXTS:
        ids = tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.encode_batch(TEXTS) == [tiny_tokenizer.encode(t) for t in TEXTS]
    assert tiny_tokenizer.decode(torch.tensor(tiny_tokenizer.encode(TEXTS[0]))) == TEXTS[0]  # model output


def test_special_tokens_and_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.vocab_size == 512
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_id == 0 and tok.pad_id == 3 and tok.bos_id is None
    assert tok.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert tok.token_to_id("no such token") is None
    # Special tokens written in text become one id each, and decode back unless skipped.
    ids = tok.encode("a<|im_start|>b<|endoftext|>")
    assert 1 in ids and 0 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    # ... unless the caller asks for them as plain text (what data preparation does).
    (plain,) = tok.encode_batch(["a<|endoftext|>b"], split_special_tokens=True)
    assert 0 not in plain and tok.decode(plain) == "a<|endoftext|>b"
    # No bos: add_special_tokens changes nothing for our own tokenizers.
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello")


def test_vocab_too_small_names_the_minimum():
    with pytest.raises(UserError, match="at least 260"):
        Tokenizer.train(["some text"], 259)


def test_save_load_keeps_ids_template_and_fingerprint(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.fingerprint == tiny_tokenizer.fingerprint
    assert len(loaded.fingerprint) == 64
    assert loaded.chat_template == CHATML_TEMPLATE
    assert (loaded.eos_id, loaded.pad_id, loaded.bos_id) == (0, 3, None)
    assert [loaded.encode(t) for t in TEXTS] == [tiny_tokenizer.encode(t) for t in TEXTS]
    # A second save/load cycle changes nothing, byte for byte.
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    # The bare tokenizer.json also loads, and still knows its eos.
    bare = Tokenizer.load(tmp_path / "tok" / "tokenizer.json")
    assert bare.fingerprint == tiny_tokenizer.fingerprint and bare.eos_id == 0


def test_fingerprint_differs_between_tokenizers(tiny_tokenizer, sample_texts):
    other = Tokenizer.train(sample_texts[:3], 300)
    assert other.fingerprint != tiny_tokenizer.fingerprint


def test_config_variants_load(tiny_tokenizer, tmp_path):
    """AddedToken dicts for special tokens, a list of named templates, chat_template.jinja beside the config."""
    tiny_tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
    config["chat_template"] = [{"name": "tool_use", "template": "tools!"}, {"name": "default", "template": "hi"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(tmp_path)
    assert tok.eos_id == 2 and tok.chat_template == "hi"
    (tmp_path / "chat_template.jinja").write_text("from the file")
    assert Tokenizer.load(tmp_path).chat_template == "from the file"


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer at .*tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(UserError, match="sentencepiece"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)


def test_chatml_template(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "tool_calls": None}]
    assert tiny_tokenizer.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n")
    prompt = tiny_tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # OpenAI-style content parts render their text.
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}]
    assert tiny_tokenizer.apply_chat_template(parts) == "<|im_start|>user\nab<|im_end|>\n"
    # The rendered prompt tokenizes into the ChatML control tokens.
    ids = tiny_tokenizer.encode(prompt)
    assert ids[0] == tiny_tokenizer.token_to_id("<|im_start|>") and ids.count(2) == 2


def test_template_features_and_errors(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer.backend, tiny_tokenizer.config, chat_template=(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ eos_token }}|{{ messages | tojson }}|{{ tools is none }}"
        "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"))
    out = tok.apply_chat_template([{"role": "user", "content": "<é>"}])
    assert out == '<|endoftext|>|[{"role": "user", "content": "<é>"}]|True[<é>]'
    with pytest.raises(UserError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(UserError, match="empty conversation"):
        tok.apply_chat_template([])
    # The sandbox refuses what a hostile template from a downloaded checkpoint might try.
    evil = Tokenizer(tiny_tokenizer.backend, {}, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(UserError, match="unsafe"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(UserError, match="no chat template"):
        Tokenizer(tiny_tokenizer.backend, {}).apply_chat_template([{"role": "user", "content": "x"}])
