"""`foundry serve` with structured output, tools, logprobs, penalties and logit_bias, through the openai client.

Sampled at temperature 1 from a tiny random model, every constrained reply must still parse and validate:
the grammar, not the model, guarantees the shape. Schemas are bounded (short strings, enums, ranged
integers) so that a random model cannot wander past max_tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import openai
import pytest

from foundry.infer import Engine
from foundry.serve import ServeConfig
from foundry.serve.errors import APIError
from foundry.serve.prepare import prepare_chat
from foundry.serve.schemas import ChatRequest
from foundry.tokenizer import Tokenizer
from tests.test_infer_constrained import TOOLS as CONSTRAINED_TOOLS
from tests.test_infer_constrained import check
from tests.test_serve import KEY, Server, build_serve_model, http

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "member", "role", "tags"],
    "additionalProperties": False,
}
TOOLS = CONSTRAINED_TOOLS[:2]  # get_weather and add: "now" (no parameters) is the grammar tests' own case
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_serve_model(tmp_path_factory.mktemp("structured") / "tiny")


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--max-n", "4", "--max-tokens", "400",
               env={"FOUNDRY_API_KEY": KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def closing_bias(tok: Tokenizer) -> dict[str, float]:
    """logit_bias toward tokens that close strings and objects, so that free JSON ends as a trained model's would."""
    return {str(i): 4.0 for i in range(tok.vocab_size) if any(c in tok.decode([i]) for c in '"]}')}


def sampled(client, seeds=range(6), **kwargs) -> list:
    """Choices of temperature-1 chat completions, n=4 per request (4 constraint copies), over `seeds`."""
    choices = []
    for seed in seeds:
        reply = client.chat.completions.create(model="tiny", messages=ASK, temperature=1, n=4, seed=seed,
                                               max_tokens=300, **kwargs)
        choices += reply.choices
    return choices


def test_json_schema_replies_always_parse_and_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    choices = sampled(client, response_format=fmt)
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        check(json.loads(c.message.content), PERSON)
    assert len({c.message.content for c in choices}) > 1  # sampling really varied them


def test_json_object_replies_are_objects(client, tok):
    choices = sampled(client, range(4), response_format={"type": "json_object"}, logit_bias=closing_bias(tok))
    for c in choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict), c.message.content


def test_forced_tool_calls_come_back_as_tool_calls_whose_arguments_validate(client):
    names = set()
    for seed in range(6):
        choice = "required" if seed % 2 else {"type": "function", "function": {"name": "add"}}
        reply = client.chat.completions.create(model="tiny", messages=ASK, temperature=1, n=4, seed=seed,
                                               max_tokens=300, tools=TOOLS, tool_choice=choice)
        for c in reply.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            (call,) = c.message.tool_calls
            assert call.type == "function" and call.id.startswith("call_")
            if seed % 2 == 0:
                assert call.function.name == "add"
            check(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            names.add(call.function.name)
    assert names == {"add", "get_weather"}  # "required" let the model pick


def test_a_streamed_forced_call_ends_with_a_tool_calls_delta(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, temperature=1, seed=3, max_tokens=300,
                                                 tools=TOOLS, tool_choice="required", stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    check(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_auto_replies_are_text_or_calls_that_validate(client, tok):
    # A bias toward "{" makes a random model open some replies with it: each of those must be a valid call.
    bias = {str(tok.encode("{", add_special_tokens=False)[0]): 5.0}
    kinds = set()
    for seed in range(6):
        reply = client.chat.completions.create(model="tiny", messages=ASK, temperature=1, n=4, seed=seed,
                                               max_tokens=300, tools=TOOLS, logit_bias=bias)
        for c in reply.choices:
            if c.message.tool_calls:
                (call,) = c.message.tool_calls
                assert c.finish_reason == "tool_calls" and c.message.content is None
                check(json.loads(call.function.arguments), SCHEMAS[call.function.name])
                kinds.add("call")
            else:
                assert not c.message.content.lstrip().startswith("{"), c.message.content
                kinds.add("text")
    assert kinds == {"call", "text"}


def test_auto_text_streams_token_by_token(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=20,
                                                 tools=TOOLS, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    whole = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=20, tools=TOOLS)
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert not whole.choices[0].message.tool_calls


def test_tools_reach_the_prompt_and_a_tool_conversation_is_accepted(client):
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, temperature=0)
    auto = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, temperature=0, tools=TOOLS)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # ChatML reads no tools: a system note does
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "length"
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    conversation = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    after = client.chat.completions.create(model="tiny", messages=conversation, max_tokens=2, tools=TOOLS)
    assert after.usage.prompt_tokens > auto.usage.prompt_tokens  # the call and its result were rendered


def test_chat_logprobs_are_the_models_and_stream_the_same(client):
    kwargs = {"model": "tiny", "messages": ASK, "max_tokens": 12, "temperature": 0, "logprobs": True,
              "top_logprobs": 5}
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 12
    # A random model writes any byte sequence: the text holds U+FFFD where its bytes are not UTF-8.
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == whole.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 5 and e.logprob <= 0
        best = max(e.top_logprobs, key=lambda t: t.logprob)
        assert e.logprob == pytest.approx(best.logprob) and e.token == best.token  # greedy took the best
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-5
    streamed = [e for c in client.chat.completions.create(**kwargs, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_completion_logprobs_have_openai_shape(client):
    got = client.completions.create(model="tiny", prompt="Grüße", max_tokens=10, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == 10
    # A token that is not whole UTF-8 is written "bytes:\\xNN..", as OpenAI does.
    raw = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                   for t in lp.tokens)
    assert raw.decode(errors="replace") == got.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] < len(got.choices[0].text)
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and value == pytest.approx(max(top.values()))
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
    chunks = list(client.completions.create(model="tiny", prompt="Grüße", max_tokens=10, temperature=0, logprobs=3,
                                            stream=True))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_echo_sends_the_prompt_first(client, tok):
    plain = client.completions.create(model="tiny", prompt="Grüße", max_tokens=5, temperature=0).choices[0].text
    got = client.completions.create(model="tiny", prompt="Grüße", max_tokens=5, temperature=0, echo=True)
    assert got.choices[0].text == "Grüße" + plain
    by_ids = client.completions.create(model="tiny", prompt=tok.encode("naïve"), max_tokens=5, temperature=0,
                                       echo=True, stream=True)
    assert "".join(c.choices[0].text for c in by_ids).startswith("naïve")


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(client, tok, model_dir):
    # lm-eval's loglikelihood through an OpenAI-compatible server: token-id prompt, echo, logprobs, max_tokens 1.
    ids = tok.encode("def main():\n    return 0")
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    import torch

    from foundry import hub

    with torch.no_grad():
        expected = hub.load(model_dir).model(torch.tensor([ids]))[0].log_softmax(-1)
    scores = [float(expected[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(scores, abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert got.choices[0].text.startswith(tok.decode(ids))
    streamed = list(client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True,
                                              logprobs=1, stream=True))
    first = streamed[0].choices[0]
    assert first.text == tok.decode(ids) and first.logprobs.token_logprobs == lp.token_logprobs[:len(ids)]


def test_logit_bias_and_penalties_reach_the_sampler(client, tok):
    token = tok.encode("e")[0]
    forced = client.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=0,
                                       logit_bias={str(token): 100})
    assert forced.choices[0].text == tok.decode([token] * 6)
    base = client.completions.create(model="tiny", prompt="hi", max_tokens=30, temperature=0)
    penalised = client.completions.create(model="tiny", prompt="hi", max_tokens=30, temperature=0,
                                          frequency_penalty=2, presence_penalty=2)
    assert penalised.choices[0].text != base.choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "add", "arguments": "{not json"}}]}]}, "messages.1.tool_calls"),
])
def test_bad_structured_requests_are_400s_and_the_server_keeps_serving(server, client, body, param):
    status, payload, _ = http(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": ASK, **body},
                              key=KEY)
    assert status == 400 and payload["error"]["param"] == param, payload
    assert payload["error"]["code"] == "invalid_value"
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=300, response_format=fmt)
    check(json.loads(reply.choices[0].message.content), PERSON)


def test_tools_use_the_templates_own_rendering_and_need_a_template(model_dir):
    engine = Engine.load(model_dir)
    request = ChatRequest.model_validate({"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 2})
    tok = engine.tokenizer
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}[{{ tools | length }} tools]"
    prepared = prepare_chat(request, engine, ServeConfig("tiny"))
    assert tok.decode(prepared.prompts[0]) == "Answer in JSON.[2 tools]"  # no note: the template shows them
    tok.chat_template = None
    with pytest.raises(APIError, match="tools need a chat template") as info:
        prepare_chat(request, engine, ServeConfig("tiny"))
    assert info.value.param == "tools"
