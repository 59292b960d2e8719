"""`foundry serve` as a real process on 127.0.0.1, driven by the official openai client and raw sockets.

One module-scoped server (API key on, small bounds) serves every test here; SIGTERM has its own file."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import openai
import pytest
import torch
import uvicorn

import foundry
from foundry import hub
from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.infer import Engine, SamplingParams
from foundry.infer.chat import encode_chat
from foundry.model import Transformer
from foundry.serve import ServeConfig
from foundry.serve.app import create_app
from foundry.serve.auth import key_matches
from foundry.serve.backend import Backend
from foundry.tokenizer import Tokenizer

KEY = "sk-test-8f2e6a1c9b7d"
CONTEXT = 8192
LONG = 8000  # tokens: seconds of work, so a request is surely still running while a test acts on it
ROOT = Path(__file__).resolve().parents[1]


def build_serve_model(path: Path) -> Path:
    """A tiny random Llama (long context) whose output head can never pick a stop token, so that greedy
    generation always runs to its token budget: the tests decide when a request ends, not chance."""
    package = Path(foundry.__file__).parent
    text = (package / "config" / "model_config.py").read_text() + "Grüße, naïve café — 日本語 ✓ 🎉\n" * 20
    tok = Tokenizer.train([text], vocab_size=400)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=CONTEXT,
                         initializer_range=0.1, eos_token_id=tok.eos_id)
    model = Transformer(config)
    model.init_weights(seed=0)
    with torch.no_grad():
        # A zero row gives logit 0, below the best of ~400 spread logits: greedy never stops by itself.
        model.lm_head.weight[sorted(t for t in tok.stop_ids if t is not None)] = 0
    return hub.save(path, model, tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m foundry.cli.serve` process; its log goes to a file the tests can read.

    --eager: the compiled decode step (serve's default) has its own tests (test_infer_compiled.py); compiling it
    at every server start here would cost the suite minutes."""

    def __init__(self, model_dir: Path, log: Path, *flags: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "foundry.cli.serve", str(model_dir), "--port", str(self.port),
               "--served-model-name", "tiny", "--eager", *flags]
        environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=environ, cwd=ROOT)
        deadline = time.monotonic() + 120
        while True:  # a readiness wait, not a timing assertion
            assert self.proc.poll() is None, f"server exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server never became healthy:\n{log.read_text()}"
            try:
                if http(self, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def http(server: Server, method: str, path: str, body: bytes | dict | None = None, key: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
    """(status, JSON body or {}, headers: case-insensitive) of one plain HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=dict(headers or {}))
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw, status, got = resp.read(), resp.status, resp.headers
    except urllib.error.HTTPError as err:
        raw, status, got = err.read(), err.code, err.headers
    try:
        return status, json.loads(raw), got
    except ValueError:
        return status, {"text": raw.decode("utf-8", "replace")}, got


def metrics(server: Server) -> dict[str, float]:
    """The server's unlabelled Prometheus samples, by name."""
    req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def wait_for(server: Server, condition, what: str, timeout: float = 60) -> dict[str, float]:
    """Poll /metrics until condition(samples) holds (fails after `timeout`, which only a hang reaches)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if condition(m):
            return m
        assert time.monotonic() < deadline, f"never saw {what}: {m}"
        time.sleep(0.02)


def raw_request(server: Server, path: str, body: dict, key: str = KEY) -> socket.socket:
    """Send one POST over a bare socket and return the socket unread (the test decides when it closes)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)  # a hang fails, not blocks
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_serve_model(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine.load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # One running sequence at a time: a second request waits in the queue, which the backpressure tests need
    # (batching many requests at once is tests/test_serve_load.py's subject).
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--max-queued-requests", "4",
               "--max-batch-size", "1", "--max-n", "4", "--max-tokens", str(LONG), "--max-body-bytes", "100000",
               env={"FOUNDRY_API_KEY": KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def greedy(engine: Engine, prompt, max_tokens: int, stop: list[str] | None = None):
    return engine.generate([prompt], SamplingParams(max_new_tokens=max_tokens, temperature=0, stop=stop or []))[0]


# ---- the API ---------------------------------------------------------------------------------

def test_health_and_models(server, client):
    assert http(server, "GET", "/health")[0] == 200  # no key needed
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_greedy_completion_equals_the_engine(client, engine):
    expected = greedy(engine, "Grüße, naïve", 24)
    got = client.completions.create(model="tiny", prompt="Grüße, naïve", max_tokens=24, temperature=0)
    assert got.choices[0].text == expected.text
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (expected.prompt_tokens, 24)
    ids = engine.encode("Grüße, naïve")  # a prompt of token ids is the same prompt
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == expected.text


def test_stop_string_ends_the_completion_before_it(client, engine):
    full = greedy(engine, "café", 40).text
    stop = full[10:13]
    got = client.completions.create(model="tiny", prompt="café", max_tokens=40, temperature=0, stop=[stop])
    assert got.choices[0].text == full[:full.index(stop)] == greedy(engine, "café", 40, [stop]).text
    assert got.choices[0].finish_reason == "stop"


def test_chat_streams_the_same_reply_as_the_engine(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello <|im_end|>"}]
    ids, stops = encode_chat(engine.tokenizer, messages)
    expected = engine.generate([ids], SamplingParams(max_new_tokens=20, temperature=0, stop=stops))[0]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=20, temperature=0)
    assert whole.choices[0].message.content == expected.text
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == 20
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_ends_with_done(server):
    sock = raw_request(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True})
    raw = read_all(sock).decode()
    assert raw.startswith("HTTP/1.1 200") and "text/event-stream" in raw
    # The last event is [DONE], followed only by the chunked encoding's end (a zero-length chunk).
    # One chunk carries the finish reason (length, or stop if the random model samples eos in 3 tokens).
    finished = raw.count('"finish_reason": "length"') + raw.count('"finish_reason": "stop"')
    assert raw.endswith("data: [DONE]\n\n\r\n0\r\n\r\n") and finished == 1


def test_n_and_seed(client):
    def ask(seed):
        r = client.completions.create(model="tiny", prompt="naïve", max_tokens=12, temperature=1, n=3, seed=seed)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = ask(7)
    assert len(first) == 3 and len(set(first)) == 3  # each choice samples with its own seed
    assert ask(7) == first  # and a seed reproduces them
    assert ask(8) != first


def test_concurrent_async_requests_equal_the_engine(server, engine):
    prompts = ["Grüße", "naïve café", "日本語", "✓ émoji", "config", "a", "🎉🎉", "model"]
    lengths = [5, 17, 9, 30, 12, 3, 21, 8]
    expected = [greedy(engine, p, n).text for p, n in zip(prompts, lengths)]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def one(i):
            if i % 2:
                return (await aclient.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                                         temperature=0)).choices[0].text
            stream = await aclient.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                                      temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream])

        # 4 at a time: the server's queue holds 4, so none of these is refused.
        first = await asyncio.gather(*(one(i) for i in range(4)))
        return first + list(await asyncio.gather(*(one(i) for i in range(4, 8))))

    assert asyncio.run(run()) == expected


# ---- errors: OpenAI's shape, a 4xx decided before any 200, and the server keeps serving ----------------

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
BAD = [  # (route, body, status, code, param)
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, "invalid_json", None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "invalid_utf8", None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', 400, "invalid_utf8", None),
    ("/v1/completions", b"[1, 2]", 400, "invalid_value", None),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, 400, "invalid_value", "temperature"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "4"}, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model_not_found", "model"),
    ("/v1/completions", {**COMPLETION, "prompt": [1] * CONTEXT}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1] * 500, "max_tokens": LONG}, 400, "context_length_exceeded",
     "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": LONG + 1}, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": [400]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {**COMPLETION, "n": 1000}, 400, "invalid_value", "n"),
    ("/v1/completions", {**COMPLETION, "n": 0}, 400, "invalid_value", "n"),
    ("/v1/completions", {**COMPLETION, "suffix": "end"}, 400, "unsupported_parameter", "suffix"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"abc": 1}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"5": 101}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"400": 1}}, 400, "invalid_value", "logit_bias"),
    ("/v1/completions", {**COMPLETION, "frequency_penalty": -2.5}, 400, "invalid_value", "frequency_penalty"),
    ("/v1/completions", {**COMPLETION, "frobnicate": 1}, 400, "unknown_parameter", "frobnicate"),
    ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 200_000}, 413, "request_too_large", None),
    ("/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": CONTEXT}, 400, "context_length_exceeded",
     "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400, "invalid_value",
     "response_format"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "retrieval"}]}, 400, "invalid_value", "tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "invalid_value", "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 2.5}, 400, "invalid_value", "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, 400, "unsupported_parameter", "functions"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "function", "content": "x"}]}, 400, "invalid_value",
     "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value",
     "messages.0.tool_call_id"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "unsupported_parameter", "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "invalid_value",
     "stream_options"),
]


@pytest.mark.parametrize("route, body, status, code, param", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, route, body, status, code, param):
    got, payload, _ = http(server, "POST", route, body, key=KEY, headers={"Content-Type": "application/json"})
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"]) == (code, param)
    assert http(server, "GET", "/v1/models", key=KEY)[0] == 200


def test_the_client_sees_a_typed_error_and_a_stream_never_starts(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=CONTEXT, stream=True)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_unknown_route_is_a_404_in_openai_shape(server):
    status, payload, _ = http(server, "GET", "/v1/nothing", key=KEY)
    assert status == 404 and payload["error"]["code"] == "not_found"


# ---- security ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/v1/completions", "POST"),
                                          ("/v1/chat/completions", "POST"), ("/metrics", "GET")])
def test_every_route_but_health_needs_the_key(server, path, method):
    body = {"/v1/completions": COMPLETION, "/v1/chat/completions": {**CHAT, "max_tokens": 2}}.get(path)
    for key in (None, "sk-wrong", KEY[:-1]):
        status, payload, _ = http(server, method, path, body, key=key)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key", (key, payload)
        assert payload["error"]["type"] == "authentication_error"
    assert http(server, method, path, body, key=KEY)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_binds_localhost_and_never_logs_the_key(server):
    assert http(server, "GET", "/health")[0] == 200
    log = server.log.read_text()
    assert "127.0.0.1" in log and "0.0.0.0" not in log
    assert KEY not in log and KEY[:-1] not in log


def test_health_is_503_until_the_model_is_loaded(engine):
    # In-process uvicorn on a thread, so that the test (not the load's speed) decides when loading ends.
    backend = Backend(max_queued=4)
    port = free_port()
    config = uvicorn.Config(create_app(ServeConfig("tiny"), backend), host="127.0.0.1", port=port,
                            log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.01)
        here = types.SimpleNamespace(url=f"http://127.0.0.1:{port}")
        assert http(here, "GET", "/health") == (503, {"status": "loading"}, ANY)
        status, payload, _ = http(here, "POST", "/v1/completions", COMPLETION)
        assert status == 503 and payload["error"]["code"] == "model_loading"
        backend.start(engine)
        assert http(here, "GET", "/health")[0] == 200
        assert http(here, "POST", "/v1/completions", COMPLETION)[0] == 200
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        backend.close()


def test_keys_are_compared_whole():
    assert key_matches("sk-a", ["sk-b", "sk-a"]) and not key_matches("sk-", ["sk-a"])
    assert not key_matches("", ["sk-a"]) and not key_matches("sk-a ", ["sk-a"])


def test_bounds_must_be_sane():
    with pytest.raises(UserError, match="--max-n must be at least 1"):
        ServeConfig("m", max_n=0)
    with pytest.raises(UserError, match="--api-key must not be empty"):
        ServeConfig("m", api_keys=[""])


# ---- backpressure and disconnects --------------------------------------------------------------

def _long_stream(client: openai.OpenAI):
    """A streaming completion that runs for seconds; returns the stream once its first text arrived."""
    stream = client.completions.create(model="tiny", prompt="long", max_tokens=LONG, temperature=0, stream=True)
    iterator = iter(stream)
    next(iterator)
    return stream


def test_a_full_queue_answers_429_with_retry_after(server, client):
    running = _long_stream(client)
    waiting = [raw_request(server, "/v1/completions", COMPLETION) for _ in range(4)]
    wait_for(server, lambda m: m["foundry_requests_waiting"] == 4, "4 waiting")
    status, payload, headers = http(server, "POST", "/v1/completions", COMPLETION, key=KEY)
    assert status == 429 and payload["error"]["code"] == "queue_full"
    assert int(headers["Retry-After"]) >= 1
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2)
    running.close()  # frees the engine: every waiting request is then served
    for sock in waiting:
        assert read_all(sock).startswith(b"HTTP/1.1 200")
    assert http(server, "POST", "/v1/completions", COMPLETION, key=KEY)[0] == 200


def test_a_streaming_client_that_leaves_stops_its_generation(server, client):
    before = metrics(server)
    stream = _long_stream(client)
    assert metrics(server)["foundry_requests_running"] == 1
    stream.close()
    after = wait_for(server, lambda m: m["foundry_requests_running"] == 0, "the generation stop")
    assert after["foundry_requests_aborted"] == before["foundry_requests_aborted"] + 1
    # It was dropped, not finished: no finished choice's tokens were counted.
    assert after["foundry_generation_tokens_total"] == before["foundry_generation_tokens_total"]


def test_a_non_streaming_client_that_leaves_stops_its_generation(server):
    before = metrics(server)
    sock = raw_request(server, "/v1/completions", {**COMPLETION, "max_tokens": LONG, "temperature": 0})
    wait_for(server, lambda m: m["foundry_requests_running"] == 1, "the request running")
    sock.close()
    after = wait_for(server, lambda m: m["foundry_requests_running"] == 0, "the generation stop")
    assert after["foundry_requests_aborted"] == before["foundry_requests_aborted"] + 1
    assert after["foundry_generation_tokens_total"] == before["foundry_generation_tokens_total"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_queued_client_that_leaves_is_dropped_from_the_queue(server, client, stream):
    before = metrics(server)
    running = _long_stream(client)
    sock = raw_request(server, "/v1/completions", {**COMPLETION, "max_tokens": LONG, "stream": stream})
    wait_for(server, lambda m: m["foundry_requests_waiting"] == 1, "the request queued")
    sock.close()
    # The worker may have handed it to the scheduler just before the abort: wait for the abort to land.
    after = wait_for(server, lambda m: m["foundry_requests_waiting"] == 0 and m["foundry_requests_running"] == 1
                     and m["foundry_requests_aborted"] == before["foundry_requests_aborted"] + 1, "the queued one gone")
    assert after["foundry_requests_running"] == 1  # the long one still runs: the queued one left by itself
    running.close()
    wait_for(server, lambda m: m["foundry_requests_running"] == 0, "the long one stop")


def test_a_quantised_speculating_server_gives_the_quantised_models_greedy_text(model_dir, tmp_path):
    # `foundry serve --quantize int8 --speculative ngram`: the flags reach the engine, the drafts are verified
    # to the plain quantised model's own greedy tokens, and /metrics counts them.
    s = Server(model_dir, tmp_path / "server.log", "--quantize", "int8", "--speculative", "ngram",
               env={"FOUNDRY_API_KEY": KEY})
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        prompt = "def f(x): return x\ndef f(x): return x\ndef f(x): return x\ndef f("
        expected = greedy(Engine.load(model_dir, quantize="int8"), prompt, 32)
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=32, temperature=0)
        assert got.choices[0].text == expected.text
        m = metrics(s)
        assert m["foundry_spec_draft_tokens_total"] > 0 and m["foundry_spec_verify_steps_total"] > 0
        assert 0 <= m["foundry_spec_acceptance_rate"] <= 1
    finally:
        s.stop()
