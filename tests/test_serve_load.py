"""Load on a real `foundry serve` process: 64 concurrent streaming requests through the continuous-batching
scheduler, each equal to the same request served alone, and evidence that they really ran side by side."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import openai
import pytest
from test_serve import (
    KEY,
    LONG,
    ROOT,
    Server,
    build_serve_model,
    metrics,
    raw_request,
    wait_for,
)

from foundry.infer import Engine, SamplingParams
from foundry.serve.backend import Backend

pytestmark = pytest.mark.slow

# A shared leading text (a "system prompt"), so that later requests find its keys/values in the prefix cache.
SHARED = ("class ModelConfig: the model's shape and its defaults, read from config.json and checked; " * 3)
PIECES = ["Grüße", "naïve café", "日本語 ✓", "🎉", "config", "a", "hidden_size", "vocab_size and eos"]


def _requests() -> list[dict]:
    """64 streaming requests of mixed prompt lengths and settings: greedy, and seeded sampling with top_p."""
    out = []
    for i in range(64):
        prompt = PIECES[i % len(PIECES)] * (1 + i % 5)
        if i % 2:
            prompt = SHARED + prompt
        body = {"prompt": prompt, "max_tokens": 4 + (i * 7) % 37}
        if i % 3 == 0:
            body["temperature"] = 0
        else:
            body.update(temperature=1.0 if i % 3 == 1 else 0.7, top_p=0.9 if i % 3 == 1 else 0.5, seed=i)
        if i % 16 == 5:
            body["n"] = 2  # two choices sharing one prompt (and its cache)
        out.append(body)
    return out


async def _one(client: openai.AsyncOpenAI, body: dict) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice of one streamed completion."""
    stream = await client.completions.create(model="tiny", stream=True, **body)
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            texts.setdefault(choice.index, []).append(choice.text)
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return [("".join(texts[i]), finish[i]) for i in sorted(texts)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_serve_model(tmp_path_factory.mktemp("load") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--max-queued-requests", "128",
               "--max-tokens", str(LONG), env={"FOUNDRY_API_KEY": KEY})
    yield s
    s.stop()


def test_64_concurrent_streams_equal_the_same_requests_served_one_at_a_time(server):
    bodies = _requests()
    # A long greedy stream holds a slot throughout: on a one-at-a-time server every request below would wait
    # behind it, so seeing it still running once all 64 are done shows they ran beside it.
    long = raw_request(server, "/v1/completions", {"model": "tiny", "prompt": "long", "max_tokens": LONG,
                                                    "temperature": 0, "stream": True})
    head = b""
    while b"data: " not in head:
        chunk = long.recv(65536)
        assert chunk, f"the long stream ended before it began: {head!r}"
        head += chunk

    async def together():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        results = await asyncio.gather(*(_one(client, b) for b in bodies), return_exceptions=True)
        await client.close()
        return results

    batched = asyncio.run(together())
    failures = [r for r in batched if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    during = metrics(server)
    assert during["foundry_requests_running"] == 1  # the long one, still generating
    assert during["foundry_kv_cache_used_tokens"] > 0
    assert during["foundry_kv_cache_capacity_tokens"] >= 64 * 8000  # the default pool: 64 full contexts
    long.close()  # the client leaves: its generation stops
    wait_for(server, lambda m: m["foundry_requests_running"] == 0, "the long stream stop")

    async def alone():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        results = [await _one(client, b) for b in bodies]
        await client.close()
        return results

    assert batched == asyncio.run(alone())
    assert all(len(r) == bodies[i].get("n", 1) for i, r in enumerate(batched))
    assert all(finish == "length" for r in batched for _, finish in r)  # the model never stops by itself
    after = metrics(server)
    assert after["foundry_kv_cache_used_tokens"] == 0 and after["foundry_requests_waiting"] == 0
    # Every odd request starts with SHARED: all but the first few to be admitted find it cached.
    assert after["foundry_prefix_cache_hit_tokens_total"] > 0


def test_sse_carries_every_choice_of_n_to_its_end(server):
    sock = raw_request(server, "/v1/completions", {"model": "tiny", "prompt": "naïve", "max_tokens": 5, "n": 3,
                                                    "temperature": 1, "seed": 3, "stream": True})
    chunks = b""
    while part := sock.recv(65536):
        chunks += part
    sock.close()
    events = [line[6:] for line in chunks.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finished = sorted(json.loads(e)["choices"][0]["index"] for e in events[:-1]
                      if json.loads(e)["choices"][0]["finish_reason"] == "length")
    assert finished == [0, 1, 2]


def test_kv_cache_memory_bounds_the_batch_and_a_request_that_does_not_fit_waits(model_dir, tmp_path):
    # 512 bytes a token (2 layers x K,V x 2 heads x 16 x fp32): 4 MiB is one slot of the whole 8192 context.
    s = Server(model_dir, tmp_path / "server.log", "--kv-cache-memory", "4MiB", "--max-tokens", str(LONG),
               env={"FOUNDRY_API_KEY": KEY})
    try:
        assert metrics(s)["foundry_kv_cache_capacity_tokens"] == 8192
        long = raw_request(s, "/v1/completions", {"model": "tiny", "prompt": "long", "max_tokens": LONG,
                                                   "temperature": 0, "stream": True})
        wait_for(s, lambda m: m["foundry_requests_running"] == 1, "the long one running")
        queued = raw_request(s, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3})
        wait_for(s, lambda m: m["foundry_requests_waiting"] == 1, "the second one waiting for the slot")
        long.close()  # frees the slot: the waiting one then runs to its end
        reply = b""
        while part := queued.recv(65536):
            reply += part
        assert reply.startswith(b"HTTP/1.1 200") and b'"finish_reason":"length"' in reply.replace(b" ", b"")
    finally:
        s.stop()


def test_a_bad_kv_cache_memory_is_one_line_before_the_server_starts(model_dir):
    run = subprocess.run([sys.executable, "-m", "foundry.cli.serve", str(model_dir), "--kv-cache-memory", "lots"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert run.returncode == 2
    expected = "foundry serve: error: --kv-cache-memory: cannot read the size 'lots': write e.g. 5GB, 500MB or 2GiB"
    assert run.stderr.strip().splitlines()[-1] == expected


def test_a_failing_engine_step_fails_what_ran_and_the_backend_keeps_serving(model_dir):
    engine = Engine.load(model_dir)
    backend = Backend(max_queued=4)
    backend.start(engine)
    real_step, calls = engine.scheduler.step, []

    def step_once_broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step()

    engine.scheduler.step = step_once_broken
    params = [SamplingParams(max_new_tokens=3, temperature=0)] * 2

    async def drive():
        broken = backend.submit([[5, 6, 7]] * 2, params)
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in broken:
                pass
        fine = backend.submit([[5, 6, 7]] * 2, params)
        return [d.completion async for d in fine if d.completion is not None]

    try:
        done = asyncio.run(drive())
    finally:
        backend.close()
    assert [c.completion_tokens for c in done] == [3, 3]
    assert backend.stats().running == backend.stats().waiting == 0


def test_generate_takes_kv_cache_memory(model_dir, capsys):
    from foundry.cli.main import main

    args = ["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0"]
    # 1KB holds one token (512 bytes each): the engine was given the budget, and says it is too small.
    assert main([*args, "--kv-cache-memory", "1KB"]) == 2
    assert "a slot of the KV cache holds 1: raise kv_cache_memory" in capsys.readouterr().err
    assert main([*args, "--kv-cache-memory", "4MiB"]) == 0
    assert "3 tokens" in capsys.readouterr().err
