"""Constrained decoding: every sampled completion of a tiny random model parses and fits its schema."""

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, trainers

import foundry
from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.infer.constrained import (
    Constraint,
    constraint_for_response_format,
    constraint_for_schema,
    ll_tokenizer,
)
from foundry.infer.tools import (
    constraint_for_tool_call,
    parse_tool_calls,
    split_tool_calls,
)
from foundry.model import Transformer
from foundry.tokenizer import Tokenizer

PADDING = 13  # embedding rows past the tokenizer's vocabulary, as checkpoints round their vocab up
SAMPLES = 24

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", None]},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "maxLength": 5}},
                    "required": ["zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "member", "role", "scores", "address"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string", "maxLength": 8},
                                                                    "unit": {"enum": ["c", "f"]}},
                                                     "required": ["city", "unit"],
                                                     "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -9, "maximum": 9},
                                         "b": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now"}},  # no parameters: arguments must be {}
]
NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    package = Path(foundry.__file__).parent
    text = (package / "config" / "model_config.py").read_text() + (package / "hub" / "directory.py").read_text()
    text += '{"name": "x", "age": 12, "member": true, "role": null, "scores": [1.5, -2]}\n' * 10
    text += "Grüße, naïve café — 日本語のテキスト ✓ émoji 🎉\n" * 10
    return Tokenizer.train([text], vocab_size=400)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    config = ModelConfig(vocab_size=tok.vocab_size + PADDING, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=1024, initializer_range=0.1, eos_token_id=tok.eos_id)
    model = Transformer(config)
    model.init_weights(seed=0)
    return model.eval()


def closing_bias(tok: Tokenizer, strength: float = 4.0) -> torch.Tensor:
    """A logit bias toward tokens that close strings, arrays and objects.

    Unbounded values (any object, free-length strings) end only when the model chooses to end them: a
    random model almost never picks `"` among 400 tokens, so its strings run to thousands of tokens.
    This bias makes it close them as a trained model would; the constraint must hold whatever the logits."""
    bias = torch.zeros(tok.vocab_size + PADDING)
    for token_id in range(tok.vocab_size):
        if any(c in tok.decode([token_id]) for c in '"]}'):
            bias[token_id] = strength
    return bias


def sample(model: Transformer, tok: Tokenizer, constraint: Constraint, seed: int, limit: int = 400,
           bias: torch.Tensor | None = None) -> str:
    """Temperature-1 sampling under the constraint: logits -> mask -> sample -> advance, until a stop id."""
    generator = torch.Generator().manual_seed(seed)
    ids = tok.encode("Answer in JSON:")
    start = len(ids)
    with torch.no_grad():
        for _ in range(limit):
            logits = model(torch.tensor([ids]))[0, -1]
            if bias is not None:
                logits = logits + bias
            allowed = constraint.mask(logits.shape[-1])
            assert allowed.dtype == torch.bool and allowed.shape == logits.shape
            assert not allowed[tok.vocab_size:].any()  # padding rows are never allowed
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
            constraint.advance(token)
            if token in tok.stop_ids:
                assert constraint.is_finished()
                return tok.decode(ids[start:])
            ids.append(token)
    raise AssertionError(f"seed {seed}: no stop within {limit} tokens: {tok.decode(ids[start:])!r}")


def check(value, schema: dict, path: str = "$") -> None:
    """A small JSON-schema validator for the keywords these tests use (AssertionError on a mismatch)."""
    if "anyOf" in schema:
        errors = []
        for branch in schema["anyOf"]:
            try:
                return check(value, branch, path)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{path}: no anyOf branch fits: {errors}")
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != const {schema['const']!r}"
    if "enum" in schema:
        assert value in schema["enum"] and type(value) in {type(x) for x in schema["enum"]}, f"{path}: {value!r}"
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: {value!r} is not an integer"
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}: {value!r} not a number"
    elif kind is not None:
        assert isinstance(value, types[kind]), f"{path}: {value!r} is not {kind}"
    if "minimum" in schema:
        assert value >= schema["minimum"], f"{path}: {value} < {schema['minimum']}"
    if "maximum" in schema:
        assert value <= schema["maximum"], f"{path}: {value} > {schema['maximum']}"
    if "maxLength" in schema:
        assert len(value) <= schema["maxLength"], f"{path}: {value!r} too long"
    if "maxItems" in schema:
        assert len(value) <= schema["maxItems"], f"{path}: {len(value)} items"
    for index, item in enumerate(value if kind == "array" else []):
        check(item, schema.get("items", {}), f"{path}[{index}]")
    if kind == "object":
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing {key!r}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(properties), f"{path}: extra keys {set(value) - set(properties)}"
        for key, item in value.items():
            if key in properties:
                check(item, properties[key], f"{path}.{key}")


def test_the_validator_can_fail():
    good = {"name": "ab", "age": 3, "member": False, "role": None, "scores": [], "address": {"zip": "1"}}
    check(good, PERSON)
    for bad in ({**good, "age": 121}, {**good, "age": True}, {**good, "role": "root"}, {**good, "extra": 1},
                {**good, "scores": [1, 2, 3, 4]}, {**good, "address": {}}, {k: good[k] for k in list(good)[1:]}):
        with pytest.raises(AssertionError):
            check(bad, PERSON)


def test_json_schema_outputs_always_parse_and_validate(model, tok):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(SAMPLES):
        text = sample(model, tok, constraint_for_response_format(fmt, tok), seed)
        check(json.loads(text), PERSON)


def test_json_object_outputs_are_objects(model, tok):
    texts, bias = set(), closing_bias(tok)
    for seed in range(SAMPLES):
        text = sample(model, tok, constraint_for_response_format({"type": "json_object"}, tok), seed, bias=bias)
        assert isinstance(json.loads(text), dict), text
        texts.add(text)
    assert len(texts) > 1  # sampling really varied the outputs


def test_forced_tool_calls_parse_and_their_arguments_validate(model, tok):
    schemas = {t["function"]["name"]: t["function"].get("parameters", NO_ARGS) for t in TOOLS}
    names = set()
    for seed in range(SAMPLES):
        choice = "required" if seed % 2 else {"type": "function", "function": {"name": "add"}}
        text = sample(model, tok, constraint_for_tool_call(TOOLS, choice, tok), seed)
        calls = parse_tool_calls(text, TOOLS)
        assert len(calls) == 1, text
        call = calls[0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert isinstance(call["function"]["arguments"], str)
        name = call["function"]["name"]
        if seed % 2 == 0:
            assert name == "add"
        check(json.loads(call["function"]["arguments"]), schemas[name])
        names.add(name)
    assert len(names) > 1  # "required" let the model pick among the functions


def test_a_complete_value_allows_only_stop_ids(tok):
    constraint = constraint_for_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                        "required": ["a"], "additionalProperties": False}, tok)
    vocab = tok.vocab_size + PADDING
    first = constraint.mask(vocab)
    assert not constraint.is_finished() and not first[sorted(tok.stop_ids)].any() and not first[tok.vocab_size:].any()
    for token in tok.encode('{"a": 12}'):
        assert constraint.mask(vocab)[token]
        constraint.advance(token)
    assert constraint.is_finished()
    assert constraint.mask(vocab).nonzero().flatten().tolist() == sorted(tok.stop_ids)
    constraint.advance(tok.eos_id)
    assert constraint.is_finished() and not constraint.mask(vocab).any()
    assert constraint.mask(tok.vocab_size - 7).shape == (tok.vocab_size - 7,)  # a model smaller than its tokenizer


def test_copies_advance_independently(tok):
    first = constraint_for_schema({"enum": ["ab", "cd"]}, tok)
    second = first.copy()
    for token in tok.encode('"ab"'):
        first.advance(token)
    assert first.is_finished() and not second.is_finished()
    assert second.mask(tok.vocab_size)[tok.encode('"')[0]]


def test_a_value_that_may_go_on_allows_both_stop_and_more(tok):
    constraint = constraint_for_schema({"type": "integer"}, tok)
    for token in tok.encode("12"):
        constraint.advance(token)
    allowed = constraint.mask(tok.vocab_size)
    assert not constraint.is_finished() and allowed[tok.eos_id] and allowed[tok.encode("3")[0]]


def test_a_forbidden_token_is_refused_loudly(tok):
    constraint = constraint_for_response_format({"type": "json_object"}, tok)
    with pytest.raises(RuntimeError, match="stop token"):
        constraint.advance(tok.eos_id)  # nothing written yet: "" is not an object
    with pytest.raises(RuntimeError, match="not allowed"):
        constraint_for_response_format({"type": "json_object"}, tok).advance(tok.encode("x")[0])
    with pytest.raises(RuntimeError, match="out of range"):  # a padding id
        constraint_for_response_format({"type": "json_object"}, tok).advance(tok.vocab_size + 1)


@pytest.mark.parametrize("fmt, message", [
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "foo"}}}, "Invalid type: foo"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"$ref": "#/$defs/missing"}}}, "invalid JSON"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string", "minLength": 5,
                                                                     "maxLength": 2}}}, "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}}, "must be a JSON object"),
    ({"type": "json_schema", "json_schema": {"name": "s"}}, "has no \"schema\""),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name must be"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "yaml"}, "response_format.type must be"),
    ("json", "response_format must be an object"),
])
def test_bad_response_formats_are_user_errors(tok, fmt, message):
    with pytest.raises(UserError, match=message) as info:
        constraint_for_response_format(fmt, tok)
    assert "\n" not in str(info.value)


def test_text_and_tool_choice_none_are_unconstrained(tok):
    assert constraint_for_response_format({"type": "text"}, tok) is None
    assert constraint_for_response_format(None, tok) is None
    assert constraint_for_tool_call(TOOLS, "none", tok) is None
    assert constraint_for_tool_call(None, "auto", tok) is None


def _accepts(constraint, tok, text: str) -> bool:
    for token in tok.encode(text, add_special_tokens=False):
        allowed = constraint.mask(tok.vocab_size)
        if allowed is not None and not allowed[token]:
            return False
        constraint.advance(token)
    return True


@pytest.mark.parametrize("choice", [None, "auto"])
def test_auto_allows_text_or_one_valid_call(tok, choice):
    def fresh():
        return constraint_for_tool_call(TOOLS, choice, tok)

    assert _accepts(fresh(), tok, "Sure, here it is {not a call}")  # text may hold braces after its start
    call = fresh()
    assert _accepts(call, tok, json.dumps({"name": "add", "arguments": {"a": 1, "b": -2}}))
    assert call.is_finished()  # one call, and nothing after it
    assert not _accepts(fresh(), tok, '{"name": "no_such_function"')  # opening "{" commits to a call
    assert not _accepts(fresh(), tok, " {")  # nor can a call hide behind leading space


@pytest.mark.parametrize("tools, choice, message", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "'nope', which is not among the tools"),
    (TOOLS, "always", "tool_choice must be"),
    ([], "required", "no tools were given"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}], "required", "tool 'f'"),
    ([{"type": "function", "function": {"name": "f g"}}], "required", "function.name must be"),
    ([{"type": "retrieval"}], "required", r"tools\[0\] must be"),
    ([TOOLS[1], TOOLS[1]], "required", "used twice"),
])
def test_bad_tools_are_user_errors(tok, tools, choice, message):
    with pytest.raises(UserError, match=message):
        constraint_for_tool_call(tools, choice, tok)


def test_parse_tool_calls_reads_the_shapes_models_write():
    bare = parse_tool_calls('{"name": "add", "arguments": {"a": 1, "b": 2}}', TOOLS)
    assert [c["function"] for c in bare] == [{"name": "add", "arguments": '{"a": 1, "b": 2}'}]
    tagged = parse_tool_calls('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
                              '"unit": "c"}}\n</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>'
                              '<tool_call>{broken</tool_call>', TOOLS)
    assert [c["function"]["name"] for c in tagged] == ["get_weather", "now"]
    assert len({c["id"] for c in tagged}) == 2
    listed = parse_tool_calls('[{"name": "now", "parameters": {}}, {"name": "add", "arguments": "{\\"a\\": 1}"}]',
                              TOOLS)
    assert [c["function"]["arguments"] for c in listed] == ["{}", '{"a": 1}']
    for text in ("The weather is fine.", '{"name": "rm_rf", "arguments": {}}', '{"answer": 42}', ""):
        assert parse_tool_calls(text, TOOLS) == []


def test_split_tool_calls_separates_content_from_calls():
    assert split_tool_calls("Just text.", TOOLS) == ("Just text.", [])
    content, calls = split_tool_calls('{"name": "now", "arguments": {}}', TOOLS)
    assert content is None and [c["function"]["name"] for c in calls] == ["now"]
    content, calls = split_tool_calls('Checking.\n<tool_call>{"name": "now", "arguments": {}}</tool_call>', TOOLS)
    assert content == "Checking." and len(calls) == 1
    content, calls = split_tool_calls('<tool_call>{"name": "now", "arguments": {}}</tool_call>', TOOLS)
    assert content is None and len(calls) == 1


def test_the_llguidance_tokenizer_is_built_once_and_sees_the_whole_vocabulary(tok):
    assert ll_tokenizer(tok) is ll_tokenizer(tok)
    assert ll_tokenizer(tok).vocab_size == tok.vocab_size


def test_a_sentencepiece_style_tokenizer_works_too():
    """Llama 2 / Mistral ship `▁`-prefixed BPE with byte fallback, not byte-level BPE: llguidance reads both."""
    backend = Backend(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    backend.train_from_iterator(['{"name": "abc", "age": 12} hello world naïve 日本'] * 20,
                                trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                                    show_progress=False))
    tok = Tokenizer(backend, {"eos_token": "</s>", "bos_token": "<s>"})
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}, "n": {"type": "integer"}},
              "required": ["a", "n"], "additionalProperties": False}
    rng = random.Random(0)
    for _ in range(SAMPLES):  # a random walk over the allowed ids: the grammar alone decides the text
        constraint, out = constraint_for_schema(schema, tok), []
        while not constraint.is_finished():
            token = rng.choice(constraint.mask(tok.vocab_size).nonzero().flatten().tolist())
            constraint.advance(token)
            out.append(token)
        check(json.loads(tok.decode(out)), schema)


def test_no_stop_id_is_a_user_error(tok):
    constraint = constraint_for_schema({"type": "integer"}, tok)
    with pytest.raises(UserError, match="end-of-sequence"):
        Constraint(constraint._matcher, [], "response_format json_object")


def test_tool_parameters_with_refs_keep_their_definitions(tok):
    """pydantic writes `"$ref": "#/$defs/Item"`; embedded in the call object such refs must still resolve,
    each function to its own definitions (here two functions define a different `Item`)."""
    item = {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 3},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}
    params = {"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"},
                                                         "maxItems": 2}},
              "required": ["items"], "additionalProperties": False, "$defs": {"Item": item}}
    tools = [{"type": "function", "function": {"name": "order", "parameters": params}},
             {"type": "function", "function": {"name": "flags", "parameters": {**params,
                                                                               "$defs": {"Item": {"type": "boolean"}}}}}]
    rng, names = random.Random(0), set()
    for index in range(SAMPLES):
        choice = "required" if index % 2 else {"type": "function", "function": {"name": "order"}}
        constraint, out = constraint_for_tool_call(tools, choice, tok), []
        while not constraint.is_finished():
            token = rng.choice(constraint.mask(tok.vocab_size).nonzero().flatten().tolist())
            constraint.advance(token)
            out.append(token)
        (call,) = parse_tool_calls(tok.decode(out), tools)
        name = call["function"]["name"]
        for value in json.loads(call["function"]["arguments"])["items"]:
            check(value, item if name == "order" else {"type": "boolean"})
        names.add(name)
    assert names == {"order", "flags"}
