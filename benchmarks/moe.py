"""MoE training throughput: foundry's Mixtral-style model vs its dense twin and vs transformers, one process.

    python benchmarks/moe.py [--steps 2] [--rounds 12] [--batch 4] [--seq 256] [--quick]

Contenders, each trained with AdamW in fp32 on the same batches, alternating round by round
(train_throughput.py's Runner and interleaving):
- foundry MoE: MixtralForCausalLM, 8 experts, top-2 (vocab 8192, hidden 256, 4 layers, 4 heads, 2 KV heads,
  expert width 512), run by CausalLMLoss as `foundry pretrain` runs it;
- foundry dense: the Mistral config of the same shape with intermediate_size 2 x 512, i.e. the active MLP
  parameters and FLOPs of the MoE's two chosen experts (the MoE adds only its router);
- transformers' MixtralForCausalLM loaded from foundry's saved directory (same weights), with
  experts_implementation="eager" and with transformers' default (grouped_mm where torch has it).
Before timing, every MoE contender's loss on the first batch must equal foundry's within 1e-4. Prints the CPU
capability, tokens/s (median and best round) and ratios as the median of per-round ratios (the host is shared:
with other processes on the cores, `--threads 1` gives steadier ratios than two threads' OpenMP barriers).
Last, one MoE block's forward + backward as landed against routed_index_select, a candidate change to
SparseMoE.routed (`x.index_select(0, token)` instead of `x[token]`), alternated call by call.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from foundry import hub
from foundry.config import ModelConfig
from foundry.infer.device import cpu_capability
from foundry.model import Transformer
from foundry.model.moe import SparseMoE, moe_blocks
from foundry.train.loss import CausalLMLoss
from foundry.train.speed import configure_fp32_matmul, matmul_peak

MIXTRAL = {"architecture": "MixtralForCausalLM", "model_type": "mixtral", "num_experts": 8, "num_experts_per_tok": 2}
SHAPES = {  # (vocab, hidden, layers, heads, KV heads, expert width)
    "default": (8192, 256, 4, 4, 2, 512),
    "quick": (512, 64, 2, 4, 2, 128),
}
LOSS_TOLERANCE = 1e-4


def load_runner_class() -> type:
    """train_throughput.py's Runner (one engine's model, AdamW, step and timings), so both benchmarks time alike."""
    spec = importlib.util.spec_from_file_location("_train_throughput", Path(__file__).with_name("train_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Runner


def configs(quick: bool, seq: int) -> tuple[ModelConfig, ModelConfig]:
    """The MoE config and the dense (Mistral) config with the MoE's active MLP width: 2 x the expert width."""
    vocab, hidden, layers, heads, kv_heads, width = SHAPES["quick" if quick else "default"]
    shape = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
             "num_key_value_heads": kv_heads, "max_position_embeddings": max(1024, seq)}
    moe = ModelConfig(intermediate_size=width, **shape, **MIXTRAL)
    dense = ModelConfig(architecture="MistralForCausalLM", model_type="mistral",
                        intermediate_size=moe.num_experts_per_tok * width, **shape)
    return moe, dense


def routed_index_select(self: SparseMoE, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
                        ) -> torch.Tensor:
    """SparseMoE.routed with one change: the tokens are gathered by index_select, not by advanced indexing.

    x[token]'s backward is index_put_ with accumulate, which on CPU costs 2-3x index_select's backward (an
    index_add_) for the same rows: ~1.2 ms against ~0.5 ms for 2048 x 256 here. Same forward, same result."""
    k = experts.shape[1]
    order = experts.reshape(-1).argsort(stable=True)
    counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts).tolist()
    token = order // k
    chunks = x.index_select(0, token).split(counts)
    outputs = [self.experts[e](chunk) for e, chunk in enumerate(chunks) if counts[e]]
    scaled = (torch.cat(outputs).float() * weights.reshape(-1)[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, scaled)


def transformers_moe(path: Path, implementation: str | None) -> tuple[torch.nn.Module, str]:
    """transformers' model of a saved directory and the experts implementation it actually runs."""
    import transformers

    kwargs = {} if implementation is None else {"experts_implementation": implementation}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    config = model.config
    return model.train(), getattr(config, "_experts_implementation_internal", None) or config._experts_implementation


def build_runners(moe: ModelConfig, dense: ModelConfig, fast: bool, first: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[list, list[str]]:
    """The contenders on equal weights, each checked on the first batch; and notes on what ran or failed."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    runner_class = load_runner_class()
    ours = Transformer(moe)
    ours.init_weights(0)
    twin = Transformer(dense)
    twin.init_weights(0)
    for model in (ours, twin):
        model.train()
    runners = [runner_class("foundry MoE", ours, CausalLMLoss(ours), fast, False),
               runner_class("foundry dense", twin, CausalLMLoss(twin), fast, False)]
    notes: list[str] = []
    with torch.no_grad():
        reference = runners[0].loss_of(*first).item()
    with tempfile.TemporaryDirectory() as tmp:
        hub.save(Path(tmp) / "m", ours)
        for requested in ("eager", None):
            label = "eager" if requested else "default"
            try:
                model, implementation = transformers_moe(Path(tmp) / "m", requested)
                if requested is None and implementation == "eager":
                    notes.append("transformers' default experts implementation resolved to eager: timed once")
                    continue
                runner = runner_class(f"transformers MoE {implementation}", model, hf_loss(model), fast, False)
                check_loss(runner, first, reference)
            except AssertionError:
                raise
            except Exception as error:  # noqa: BLE001 - a backend that cannot run here: say why, time the rest
                notes.append(f"transformers MoE ({label} experts) did not run: {type(error).__name__}: {error}")
                continue
            notes.append(f"transformers MoE ({label} experts) ran experts_implementation={implementation!r}")
            runners.append(runner)
    return runners, notes


def hf_loss(model: torch.nn.Module):
    """Mean next-token cross-entropy of a transformers model, as train_throughput.py computes it."""
    return lambda x, y: F.cross_entropy(model(x).logits.float().flatten(0, 1), y.flatten())


def check_loss(runner, batch: tuple[torch.Tensor, torch.Tensor], reference: float) -> None:
    """Refuse to time a contender whose first-batch loss differs from foundry's: it would not be like for like."""
    with torch.no_grad():
        loss = runner.loss_of(*batch).item()
    if abs(loss - reference) > LOSS_TOLERANCE:
        raise AssertionError(f"{runner.name}: first-batch loss {loss:.6f} differs from foundry MoE's "
                             f"{reference:.6f} by more than {LOSS_TOLERANCE}")


def ratio(runners: dict, numerator: str, denominator: str) -> str:
    """Median over rounds of numerator's speed over denominator's, timed in the same round."""
    if numerator not in runners or denominator not in runners:
        return "n/a"
    pairs = zip(runners[numerator].times, runners[denominator].times)
    return f"{statistics.median(theirs / mine for mine, theirs in pairs):.2f}x"


def time_routed(block: SparseMoE, tokens: int, pairs: int) -> tuple[float, float, float]:
    """One MoE block's routing, experts and backward on `tokens` tokens: SparseMoE.routed as landed against
    routed_index_select, alternated `pairs` times. (median ms landed, median ms proposed, median paired ratio)."""
    x = torch.randn(tokens, block.gate.weight.shape[1], requires_grad=True, generator=torch.Generator().manual_seed(2))

    def step(routed) -> float:
        start = time.perf_counter()
        weights, experts = block.gate(block.gate.logits(x))
        routed(block, x, weights, experts).sum().backward()
        return time.perf_counter() - start

    with torch.no_grad():
        weights, experts = block.gate(block.gate.logits(x))
        reference = SparseMoE.routed(block, x, weights, experts)
        if not torch.equal(reference, routed_index_select(block, x, weights, experts)):
            raise AssertionError("routed_index_select's output differs from SparseMoE.routed's")
    for _ in range(3):
        step(SparseMoE.routed)
        step(routed_index_select)
    landed, proposed = zip(*((step(SparseMoE.routed), step(routed_index_select)) for _ in range(pairs)))
    block.zero_grad(set_to_none=True)
    return (statistics.median(landed) * 1e3, statistics.median(proposed) * 1e3,
            statistics.median(a / b for a, b in zip(landed, proposed)))


def print_setup(args: argparse.Namespace, moe: ModelConfig, dense: ModelConfig) -> None:
    """The machine, the two shapes and their active parameter counts, the run's size."""
    peak, how = matmul_peak(torch.device("cpu"), torch.float32)
    print(f"CPU: {cpu_capability()}; torch {torch.__version__}, {args.threads} threads, fp32 matmul precision "
          f"{torch.get_float32_matmul_precision()!r}; {peak / 1e9:.0f} GFLOP/s now ({how}); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"MoE: vocab {moe.vocab_size}, hidden {moe.hidden_size}, {moe.num_hidden_layers} layers, "
          f"{moe.num_attention_heads} heads ({moe.num_key_value_heads} KV), {moe.num_experts} experts of width "
          f"{moe.expert_size}, top-{moe.num_experts_per_tok}: {moe.num_params():,} parameters, "
          f"{moe.num_params(active_only=True):,} active")
    print(f"dense: same shape, MLP width {dense.intermediate_size}: {dense.num_params():,} parameters, all active "
          f"(the MoE's extra active parameters are its routers: {moe.num_params(True) - dense.num_params():,})")
    print(f"batch {args.batch} x {args.seq}, {args.steps} steps x {args.rounds} rounds, AdamW, fp32")
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("note: other processes are using these CPUs: expect noisy figures; trust the per-round ratios "
              "more than tokens/s, and try --threads 1")


def print_results(runners: list, tokens: int) -> None:
    """tokens/s (median and best round) and the ratios, each the median of per-round ratios."""
    by_name = {runner.name: runner for runner in runners}
    eager = "transformers MoE eager"
    print(f"\n{'contender':<30}{'tokens/s':>10}{'best round':>12}{'vs transformers eager':>23}"
          f"{'vs foundry dense':>18}")
    for runner in runners:
        median, best = tokens / statistics.median(runner.times), tokens / min(runner.times)
        print(f"{runner.name:<30}{median:>10,.0f}{best:>12,.0f}{ratio(by_name, runner.name, eager):>23}"
              f"{ratio(by_name, runner.name, 'foundry dense'):>18}")
    print()
    for other in (name for name in by_name if name.startswith("transformers")):
        print(f"foundry MoE / {other}: {ratio(by_name, 'foundry MoE', other)}")
    print(f"foundry MoE / foundry dense: {ratio(by_name, 'foundry MoE', 'foundry dense')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--fp32-matmul", choices=("auto", "on", "off"), default="auto",
                        help="oneDNN fp32 matmuls for every contender (auto: as foundry pretrain decides)")
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 2 x 32, 2 steps x 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.batch, args.seq = 2, 2, 2, 32
    torch.set_num_threads(args.threads)
    fast = configure_fp32_matmul(args.fp32_matmul, torch.device("cpu"))
    moe, dense = configs(args.quick, args.seq)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps):
        x = torch.randint(0, moe.vocab_size, (args.batch, args.seq + 1), generator=gen)
        batches.append((x[:, :-1], x[:, 1:]))
    print_setup(args, moe, dense)

    runners, notes = build_runners(moe, dense, fast, batches[0])
    for note in notes:
        print(note)
    print(f"first-batch loss equal to foundry MoE's within {LOSS_TOLERANCE} for every MoE contender")
    for runner in runners:  # warm-up: allocator, oneDNN primitive caches, first-touch of optimizer state
        runner.run(batches[:2], record=False)
    for round_ in range(args.rounds):  # every other round reversed: no contender always runs after the same one
        for runner in runners if round_ % 2 == 0 else runners[::-1]:
            runner.run(batches)
    print_results(runners, args.batch * args.seq)

    tokens = args.batch * args.seq
    landed, proposed, speedup = time_routed(moe_blocks(runners[0].model)[0], tokens, 5 if args.quick else 30)
    print(f"one SparseMoE block, {tokens} tokens, forward + backward: routed as landed {landed:.2f} ms, with "
          f"index_select {proposed:.2f} ms (median of paired ratios: {speedup:.2f}x)")


if __name__ == "__main__":
    main()
