"""Decode throughput: foundry's Engine vs transformers' generate, same checkpoint, one process, alternating.

    python benchmarks/decode_throughput.py [--rounds 3] [--new-tokens 128] [--batches 1 16] [--no-compile] [--threads 2]

The ENVIRONMENT.md model (vocab 8192, hidden 384, 6 layers, 6 heads, 2 KV heads, MLP 1024; random
init, saved once) decodes greedily in fp32 on 2 threads: prompts of 32 random tokens, exactly
--new-tokens new tokens per row (no eos), batch 1 and batch 16. Token ids in and out on both sides,
so neither pays for detokenization. Prints tokens/s (prefill included, median of the rounds) and
the ratio to transformers for foundry's eager Engine and its compiled decode step (Engine(compile=True);
its one-off compile is timed apart); also checks that all produced the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from foundry import hub
from foundry.config import ModelConfig
from foundry.infer.engine import Engine
from foundry.infer.sampling import SamplingParams
from foundry.model import Transformer

CONFIG = ModelConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=2048)
PROMPT_LEN = 32


def ours(engine: Engine, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    return [c.token_ids for c in engine.generate(prompts.tolist(), params)]


def theirs(model, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled engine")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as ENVIRONMENT.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        model = Transformer(CONFIG)
        model.init_weights(seed=0)
        path = hub.save(Path(tmp) / "small", model)
        engine = Engine.load(path)
        compiled = None if args.no_compile else Engine.load(path, compile=True)
        reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads "
              f"{torch.get_num_threads()}, {CONFIG.num_params() / 1e6:.1f}M parameters, fp32, greedy, "
              f"prompt {PROMPT_LEN}, {args.new_tokens} new tokens, median of {args.rounds} rounds")
        runners = {"foundry": lambda p: ours(engine, p, args.new_tokens),
                   "transformers": lambda p: theirs(reference, p, args.new_tokens)}
        if compiled is not None:
            runners["foundry compiled"] = lambda p: ours(compiled, p, args.new_tokens)
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, CONFIG.vocab_size, (batch, PROMPT_LEN), generator=gen)
            outputs = {}
            for name, run in runners.items():  # warm-up (and compile), and the tokens to compare
                start = time.perf_counter()
                outputs[name] = run(prompts)
                if name == "foundry compiled":
                    print(f"batch {batch:>2}: first call of the compiled engine {time.perf_counter() - start:.1f} s")
            times: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(args.rounds):
                for name, run in runners.items():  # alternate, so that host noise hits both alike
                    start = time.perf_counter()
                    run(prompts)
                    times[name].append(time.perf_counter() - start)
            rate = {name: batch * args.new_tokens / statistics.median(t) for name, t in times.items()}
            for name in runners:
                same = sum(a == b for a, b in zip(outputs[name], outputs["transformers"]))
                print(f"batch {batch:>2}: {name:<17} {rate[name]:8.1f} tok/s   "
                      f"{rate[name] / rate['transformers']:.2f}x transformers   "
                      f"(greedy tokens equal to transformers' in {same}/{batch} rows)")


if __name__ == "__main__":
    main()
