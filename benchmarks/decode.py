"""Decode speed: foundry's engine (fp32, bf16, int8, int4, speculative) vs transformers and llama.cpp, one process.

    python benchmarks/decode.py [--model DIR] [--rounds 3] [--new-tokens 128] [--batches 1 16] [--threads 2]
                                [--eager-only] [--llama-cpp [--install-llama-cpp]] [--no-memory] [--no-speculative]

Without --model: the ENVIRONMENT.md model (vocab 8192, hidden 384, 6 layers, 6 heads, 2 KV heads, MLP 1024;
random init, with a BPE trained on the stdlib in a second or two), saved once. With --model: that directory or
run directory (e.g. `make demo`'s demo-out/run, a trained model: then the speculative row means something).

Every engine decodes greedily on the same prompts (32 random token ids a row), exactly --new-tokens new tokens
per row (no eos), token ids in and out. Reported: tokens/s (prefill included, median of the rounds, engines
alternating so host noise hits all alike) and the ratio to transformers fp32 in the same run; for fp32
engines, how many rows gave transformers' tokens. Compiled engines compile first (timed apart).

Speculative rows (batch 1): code completion, the first 256 tokens of stdlib files as prompts, the same engine
with and without prompt-lookup (n-gram) drafting; reports the speed-up and the acceptance rate.

--llama-cpp: llama.cpp through llama-cpp-python on the same weights exported by foundry (`foundry export
--format gguf`, f32 and q8_0), batch 1. --install-llama-cpp builds it first (several minutes on two cores).
Memory: the weights' bytes, and the peak resident memory of a fresh process that loads the (quantised)
directory and decodes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from foundry import hub
from foundry.config import ModelConfig
from foundry.infer.device import cpu_capability, cpu_has_native_bf16
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams
from foundry.infer.speculative import SpeculativeConfig
from foundry.model import Transformer
from foundry.model.quantized import memory_bytes
from foundry.model.weight_only import quantize_model

CONFIG = ModelConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=2048)
PROMPT_LEN = 32
CODE_PROMPT_LEN = 256
LLAMA_CPP = "llama-cpp-python==0.3.36"

Runner = Callable[[list[list[int]]], list[list[int]]]


def engine_runner(engine: Engine, new_tokens: int) -> Runner:
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    engine.stop_ids = set()  # exactly new_tokens a row, as transformers' min_new_tokens
    return lambda prompts: [c.token_ids for c in engine.generate(prompts, params)]


def transformers_runner(path: Path, new_tokens: int) -> Runner:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(prompts: list[list[int]]) -> list[list[int]]:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()
    return run


def llama_cpp_runner(gguf_path: Path, new_tokens: int, threads: int) -> Runner:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                          n_batch=512, verbose=False)

    def run(prompts: list[list[int]]) -> list[list[int]]:
        outputs = []
        for prompt in prompts:
            llm.reset()
            tokens = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
            outputs.append(tokens)
        return outputs
    return run


def foundry_engines(path: Path, args: argparse.Namespace) -> dict[str, Engine]:
    """The foundry engines to compare: eager fp32, then (unless --eager-only) compiled fp32/bf16/int8/int4."""
    engines = {"foundry eager fp32": Engine.load(path)}
    if args.eager_only:
        return engines
    variants: list[tuple[str, torch.dtype, str | None]] = [("fp32", torch.float32, None)]
    if cpu_has_native_bf16():
        variants.append(("bf16", torch.bfloat16, None))
    variants += [("int8", torch.float32, "int8"), ("int4", torch.float32, "int4")]
    for name, dtype, scheme in variants:
        loaded = hub.load(path, dtype=dtype)
        if scheme is not None:
            quantize_model(loaded.model, scheme)
        engine = Engine(loaded.model, loaded.tokenizer, generation_config=loaded.generation_config,
                        compile=True, prepack=True)
        start = time.perf_counter()
        engine.warm_up()
        print(f"  compiled {name}: warm-up {time.perf_counter() - start:.1f} s (a compile, or the disk cache)", flush=True)
        engines[f"foundry compiled {name}"] = engine
    return engines


def timed(runners: dict[str, Runner], prompts: list[list[int]], rounds: int
          ) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Median seconds per engine over alternating rounds (after one untimed call each), and their tokens."""
    outputs = {name: run(prompts) for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(prompts)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def speed_table(runners: dict[str, Runner], args: argparse.Namespace, vocab_size: int) -> None:
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, vocab_size, (batch, PROMPT_LEN), generator=gen).tolist()
        chosen = {n: r for n, r in runners.items() if batch == 1 or not n.startswith("llama.cpp")}
        seconds, outputs = timed(chosen, prompts, args.rounds)
        base = batch * args.new_tokens / seconds["transformers fp32"]
        print(f"\nbatch {batch}: {'engine':<26} {'tok/s':>9} {'x transformers':>15}   greedy rows equal to transformers")
        for name in chosen:
            rate = batch * args.new_tokens / seconds[name]
            exact = "fp32" in name or "f32" in name
            same = (f"{sum(a == b for a, b in zip(outputs[name], outputs['transformers fp32'], strict=True))}/{batch}"
                    if exact else "- (not fp32)")
            print(f"batch {batch}: {name:<26} {rate:9.1f} {rate / base:14.2f}x   {same}")


def code_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """The first CODE_PROMPT_LEN tokens of `count` stdlib modules (long enough ones, in a fixed order)."""
    from foundry.data.corpus import stdlib_files

    prompts = []
    for _, path in sorted(stdlib_files(), key=lambda item: item[0]):
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        if len(ids) >= 4 * CODE_PROMPT_LEN:
            prompts.append(ids[:CODE_PROMPT_LEN])
        if len(prompts) == count:
            break
    return prompts


def speculative_table(path: Path, args: argparse.Namespace) -> None:
    tokenizer = hub.load(path).tokenizer
    if tokenizer is None:
        print("\nspeculative: skipped (the model has no tokenizer for code prompts)")
        return
    prompts = code_prompts(tokenizer, 4)
    ngram = SpeculativeConfig(method="ngram", num_tokens=args.speculative_tokens)
    print(f"\nspeculative, code completion ({len(prompts)} stdlib prompts of {CODE_PROMPT_LEN} tokens, batch 1, "
          f"n-gram drafts, k={args.speculative_tokens}):")
    for compiled in ([False] if args.eager_only else [False, True]):
        plain = Engine.load(path, compile=compiled)
        drafting = Engine.load(path, compile=compiled, speculative=ngram)
        for engine in (plain, drafting):
            engine.warm_up()
        runners = {"plain": engine_runner(plain, args.new_tokens), "n-gram": engine_runner(drafting, args.new_tokens)}
        total = {"plain": 0.0, "n-gram": 0.0}
        same = 0
        for prompt in prompts:
            seconds, outputs = timed(runners, [prompt], args.rounds)
            same += outputs["plain"] == outputs["n-gram"]
            for name in total:
                total[name] += seconds[name]
        stats = drafting.spec_stats
        tokens = len(prompts) * args.new_tokens
        print(f"  {'compiled' if compiled else 'eager':<8}: plain {tokens / total['plain']:6.1f} tok/s, n-gram "
              f"{tokens / total['n-gram']:6.1f} tok/s: {total['plain'] / total['n-gram']:.2f}x; acceptance "
              f"{stats.acceptance_rate:.1%}, {stats.mean_accepted:.2f} accepted drafts per verification; "
              f"outputs equal {same}/{len(prompts)}")
    if "random init" in args.model_label:
        print("  (random weights: acceptance only reflects the model's own loops; pass --model for a trained one)")


def memory_probe(path: str) -> None:
    """(In a fresh process) load a model directory, decode 16 tokens; print its weight bytes and the process's
    peak resident memory, as JSON."""
    loaded = hub.load(path)
    engine = Engine(loaded.model, loaded.tokenizer, kv_cache_memory=16 * 2**20)  # a small KV pool: the weights show
    engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=16))
    print(json.dumps({"weights": memory_bytes(loaded.model), "peak": peak_resident_bytes()}))


def peak_resident_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM (getrusage's maxrss would include the parent's, as it
    survives exec), elsewhere maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_table(path: Path, tmp: Path) -> None:
    print("\nmemory (a fresh process loads the directory, eager, a 16 MiB KV pool, and decodes 16 tokens; its peak "
          "includes torch's own few hundred MiB):")
    base = None
    for scheme in ("fp32", "int8", "int4"):
        model_dir = path
        if scheme != "fp32":  # as `foundry quantize` writes it, so that no fp32 copy is ever loaded
            loaded = hub.load(path)
            quantize_model(loaded.model, scheme)
            model_dir = hub.save(tmp / f"memory-{scheme}", loaded.model, loaded.tokenizer)
        out = subprocess.run([sys.executable, __file__, "--memory-probe", "--model", str(model_dir)],
                             capture_output=True, text=True, check=True).stdout
        probe = json.loads(out.strip().splitlines()[-1])
        base = base or probe
        print(f"  {scheme}: weights {probe['weights'] / 2**20:7.1f} MiB ({probe['weights'] / base['weights']:.2f}x), "
              f"process peak {probe['peak'] / 2**20:7.1f} MiB ({probe['peak'] / base['peak']:.2f}x)")


def llama_cpp_runners(path: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Runner]:
    if args.install_llama_cpp:
        constraints = Path(__file__).resolve().parents[1] / "constraints.txt"
        env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON")
        subprocess.run([sys.executable, "-m", "pip", "install", "-c", str(constraints), LLAMA_CPP], check=True, env=env)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(f"llama.cpp: skipped (llama-cpp-python is not installed; --install-llama-cpp builds {LLAMA_CPP})")
        return {}
    from foundry.hub.gguf import write_gguf

    runners = {}
    for kind in ("f32", "q8_0"):
        gguf_path = tmp / f"model-{kind}.gguf"
        write_gguf(path, gguf_path, kind)
        runners[f"llama.cpp {kind}"] = llama_cpp_runner(gguf_path, args.new_tokens, args.threads)
    return runners


def default_model(tmp: Path) -> Path:
    """The ENVIRONMENT.md config, random init, with a stdlib BPE, saved in tmp."""
    from foundry.data.corpus import train_tokenizer

    tokenizer = train_tokenizer(["stdlib"], CONFIG.vocab_size, tmp / "tokenizer")
    model = Transformer(CONFIG)
    model.init_weights(seed=0)
    return hub.save(tmp / "small", model, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model or run directory (default: the ENVIRONMENT.md model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as ENVIRONMENT.md)")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled engines (no compile time)")
    parser.add_argument("--speculative-tokens", type=int, default=4, help="drafts per step (k)")
    parser.add_argument("--llama-cpp", action="store_true", help="add llama.cpp f32 and q8_0 (batch 1)")
    parser.add_argument("--install-llama-cpp", action="store_true", help=f"pip install {LLAMA_CPP} first")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--no-speculative", action="store_true", help="skip the speculative table")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args.model)
    import transformers

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = hub.resolve_model_dir(args.model) if args.model else default_model(tmp)
        config = hub.load(path).model.config
        args.model_label = args.model or "ENVIRONMENT.md model, random init"
        print(f"CPU: {cpu_capability()}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"threads {torch.get_num_threads()}")
        print(f"model: {args.model_label}, {config.num_params() / 1e6:.1f}M parameters; greedy, prompt {PROMPT_LEN}, "
              f"{args.new_tokens} new tokens, median of {args.rounds} rounds", flush=True)
        runners: dict[str, Runner] = {"transformers fp32": transformers_runner(path, args.new_tokens)}
        for name, engine in foundry_engines(path, args).items():
            runners[name] = engine_runner(engine, args.new_tokens)
        if args.llama_cpp or args.install_llama_cpp:
            runners.update(llama_cpp_runners(path, tmp, args))
        speed_table(runners, args, config.vocab_size)
        if not args.no_speculative:
            speculative_table(path, args)
        if not args.no_memory:
            memory_table(path, tmp)


if __name__ == "__main__":
    main()
