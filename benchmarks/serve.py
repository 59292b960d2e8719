"""Serving: `foundry serve` driven over HTTP by the openai client vs transformers' generate, one run.

    python benchmarks/serve.py [--requests 16] [--threads 2] [--port 8765] [--compile]

The ENVIRONMENT.md model (vocab 8192, hidden 384, 6 layers, 6 heads, 2 KV heads, MLP 1024; random
init, fp32) with an 8192-token BPE trained on the stdlib. Metrics follow vLLM's `bench serve`:
TTFT is client-side (request sent -> first streamed token), TPOT = (latency - TTFT) / (tokens - 1),
ITL is the gap between streamed chunks, output throughput = generated tokens / wall time; failed
requests are counted and left out. The server and transformers never run at the same time (they
share the CPU). Scenarios:
  1. batch 1: requests one after another, greedy, 128 new tokens, vs transformers generate batch 1;
  2. --requests concurrent streaming requests of varied prompt and output lengths, vs transformers
     generate on one static batch of the same prompts (left-padded; the longest output for all);
  3. a shared 512-token system prompt: TTFT of the first request and of a second one sharing it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from foundry import hub  # noqa: E402
from foundry.config import ModelConfig  # noqa: E402
from foundry.data.corpus import iter_documents  # noqa: E402
from foundry.infer.device import cpu_capability  # noqa: E402
from foundry.model import Transformer  # noqa: E402
from foundry.tokenizer import Tokenizer  # noqa: E402

CONFIG = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
              intermediate_size=1024, max_position_embeddings=2048)


def build_model(out: Path) -> Path:
    texts = [text for _, text in iter_documents(["stdlib"], "**/*", "text")]
    tokenizer = Tokenizer.train(texts[:300], 8192)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, **CONFIG)
    model = Transformer(config)
    model.init_weights(seed=0)
    return hub.save(out, model, tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, threads: int, compile: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "foundry", "serve", str(model_dir), "--port", str(port),
                             "--served-model-name", "model", "--max-tokens", "512"] + ["--compile"] * compile,
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import urllib.error
    import urllib.request

    for _ in range(3000):  # a compiled server compiles its decode step before it is healthy
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                if reply.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        time.sleep(0.2)
    raise SystemExit("the server did not become healthy in 600 s")


async def one_request(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    sent, chunks = time.perf_counter(), []
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                chunks.append(time.perf_counter())
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # counted as a failure, as vLLM's benchmark does
        return {"ok": False, "error": repr(exc)}
    done = time.perf_counter()
    if not chunks:
        return {"ok": False, "error": "no tokens"}
    ttft = chunks[0] - sent
    return {"ok": True, "ttft": ttft, "latency": done - sent, "tokens": tokens,
            "tpot": (done - sent - ttft) / max(tokens - 1, 1), "itl": [b - a for a, b in zip(chunks, chunks[1:])]}


async def serve_batch(port: int, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_request(client, "model", p, m) for p, m in zip(prompts, max_tokens)))
    wall = time.perf_counter() - start
    await client.close()
    return results, wall


def hf_generate(model, prompts: list[list[int]], max_new: int) -> tuple[int, float]:
    """Static left-padded batch through transformers' generate: (useful new tokens, seconds)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                       pad_token_id=0)
    return len(prompts) * max_new, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--compile", action="store_true", help="serve with --compile (the compiled decode step)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "small")
        vocab = ModelConfig.from_hf_dict(__import__("json").loads((model_dir / "config.json").read_text())).vocab_size
        reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        port = args.port or free_port()
        server = start_server(model_dir, port, args.threads, args.compile)
        print(f"CPU {cpu_capability()}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"{args.threads} threads, fp32, greedy, server {'--compile' if args.compile else 'eager'}")
        try:
            rand = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
            # 1. batch 1, sequential
            prompt = rand(32)
            asyncio.run(serve_batch(port, [prompt], [16]))  # warm-up
            ours = [asyncio.run(serve_batch(port, [prompt], [128]))[0][0] for _ in range(3)]
            if not all(r["ok"] for r in ours):
                raise SystemExit(f"batch-1 requests failed: {ours}")
            ours_rate = statistics.median(r["tokens"] / r["latency"] for r in ours if r["ok"])
            hf_generate(reference, [prompt], 16)
            theirs_rate = statistics.median(n / s for n, s in (hf_generate(reference, [prompt], 128) for _ in range(3)))
            print(f"1. batch 1: foundry serve {ours_rate:7.1f} tok/s, transformers {theirs_rate:7.1f} tok/s "
                  f"-> {ours_rate / theirs_rate:.2f}x")
            # 2. concurrent requests of varied lengths
            lengths = [int(x) for x in torch.randint(16, 257, (args.requests,), generator=gen)]
            outs = [int(x) for x in torch.randint(32, 129, (args.requests,), generator=gen)]
            prompts = [rand(n) for n in lengths]
            results, wall = asyncio.run(serve_batch(port, prompts, outs))
            ok = [r for r in results if r["ok"]]
            tokens = sum(r["tokens"] for r in ok)
            hf_tokens, hf_seconds = hf_generate(reference, prompts, max(outs))
            useful = sum(outs)  # what the requests asked for; the static batch generates max(outs) for all
            print(f"2. {args.requests} concurrent: foundry {tokens / wall:7.1f} output tok/s "
                  f"({len(results) - len(ok)} failed), transformers static batch {useful / hf_seconds:7.1f} "
                  f"useful tok/s ({hf_tokens / hf_seconds:.1f} generated) -> {tokens / wall / (useful / hf_seconds):.2f}x; "
                  f"TTFT p50 {pct([r['ttft'] for r in ok], .5) * 1e3:.0f} ms p99 "
                  f"{pct([r['ttft'] for r in ok], .99) * 1e3:.0f} ms, TPOT p50 "
                  f"{pct([r['tpot'] for r in ok], .5) * 1e3:.1f} ms, ITL p99 "
                  f"{pct([x for r in ok for x in r['itl']], .99) * 1e3:.1f} ms")
            # 3. a shared 512-token system prompt
            system = rand(512)
            first = asyncio.run(serve_batch(port, [system + rand(16)], [8]))[0][0]
            second = asyncio.run(serve_batch(port, [system + rand(16)], [8]))[0][0]
            print(f"3. shared 512-token prefix: TTFT first {first['ttft'] * 1e3:.0f} ms, second "
                  f"{second['ttft'] * 1e3:.0f} ms -> {second['ttft'] / first['ttft']:.2f} of the first")
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
