"""Training throughput: foundry vs transformers' LlamaForCausalLM, same weights, same batches, one process.

    python benchmarks/train_throughput.py [--steps 6] [--rounds 3] [--quick]

Both train the ENVIRONMENT.md config (vocab 8192, hidden 384, 6 layers, 6 heads, 2 KV heads,
MLP 1024: 15.7M parameters) with AdamW on batch 8 x 256, alternating round by round, in fp32 and
in bf16 autocast. Prints tokens/s, the ratio to transformers, and CPU MFU: achieved FLOP/s
(6N + 12·L·H·Q·T per token) over the best matmul peak measured here in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from foundry import hub
from foundry.config import ModelConfig
from foundry.model import Transformer
from foundry.train.loss import CausalLMLoss
from foundry.train.speed import configure_fp32_matmul

CONFIG = ModelConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=2048)
BATCH, SEQ = 8, 256


def matmul_peak(dtype: torch.dtype, precision: str, n: int = 2048, reps: int = 8) -> float:
    """Best FLOP/s of an n x n x n product over `reps` tries."""
    torch.set_float32_matmul_precision(precision)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class Runner:
    """One engine's training state: model, optimizer, step function, and how to time it."""

    def __init__(self, name: str, model: torch.nn.Module, loss_of, fast_fp32: bool, bf16: bool):
        self.name, self.model, self.fast_fp32, self.bf16 = name, model, fast_fp32, bf16
        self.loss_of = loss_of
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext():
            loss = self.loss_of(x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def run(self, batches: list[tuple[torch.Tensor, torch.Tensor]], record: bool = True) -> None:
        torch.set_float32_matmul_precision("medium" if self.fast_fp32 else "highest")
        t0 = time.perf_counter()
        for x, y in batches:
            self.step(x, y)
        if record:
            self.times.append((time.perf_counter() - t0) / len(batches))


def build_runners(bf16: bool, quick: bool) -> list[Runner]:
    """foundry (eager; compiled) and transformers (as users run it; with the same fp32 hint) on equal weights."""
    import transformers

    torch.manual_seed(0)
    ours = Transformer(CONFIG)
    ours.init_weights(0)
    with tempfile.TemporaryDirectory() as tmp:
        hub.save(Path(tmp) / "m", ours)
        hf = [transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32)
              for _ in range(1 if quick else 2)]
        eager = hub.load(Path(tmp) / "m").model
    fast = configure_fp32_matmul("auto", torch.device("cpu"))
    def hf_loss(model):
        return lambda x, y: F.cross_entropy(model(x).logits.float().flatten(0, 1), y.flatten())

    runners = [Runner("transformers", hf[0], hf_loss(hf[0]), False, bf16)]
    if not quick:
        runners.append(Runner("transformers +fp32 hint", hf[1], hf_loss(hf[1]), True, bf16))
    for model in (ours, eager):
        model.train()
    # Exactly what `foundry pretrain` runs: the CausalLMLoss module, compiled or not.
    runners.append(Runner("foundry eager", eager, CausalLMLoss(eager), fast, bf16))
    runners.append(Runner("foundry --compile", ours, torch.compile(CausalLMLoss(ours)), fast, bf16))
    return runners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per engine per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip the transformers+hint row")
    parser.add_argument("--force-bf16", action="store_true",
                        help="run bf16 autocast even on a CPU without native bf16 matmuls")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = max(matmul_peak(torch.float32, "highest"), matmul_peak(torch.float32, "medium"))
    peak_bf16 = matmul_peak(torch.bfloat16, "highest", n=1024, reps=3)
    flops_per_token = CONFIG.train_flops_per_token(SEQ)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps):
        x = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=gen)
        batches.append((x[:, :-1], x[:, 1:]))
    print(f"config: {CONFIG.num_params():,} parameters, batch {BATCH} x {SEQ}, {args.threads} threads")
    print(f"measured matmul peak: fp32 {peak / 1e9:.0f} GFLOP/s, bf16 {peak_bf16 / 1e9:.0f} GFLOP/s")
    modes = [False, True]
    if peak_bf16 < 0.5 * peak and not args.force_bf16:
        modes = [False]
        print("bf16 autocast skipped: this CPU has no native bf16 matmul (no AVX512_BF16/AMX), so both "
              "engines would time bf16 emulation; pass --force-bf16 to run it anyway")
    for bf16 in modes:
        runners = build_runners(bf16, args.quick)
        for runner in runners:  # warm-up: compilation, allocator, oneDNN primitive caches
            runner.run(batches[:2], record=False)
        for _ in range(args.rounds):
            for runner in runners:
                runner.run(batches)
        reference = statistics.median(runners[0].times)
        mode = "bf16 autocast" if bf16 else "fp32"
        print(f"\n{mode}: {'engine':<26}{'tokens/s':>10}{'vs transformers':>17}{'MFU':>8}")
        for runner in runners:
            per_step = statistics.median(runner.times)
            tok_s = BATCH * SEQ / per_step
            mfu = tok_s * flops_per_token / (peak_bf16 if bf16 else peak)
            print(f"{'':<{len(mode) + 2}}{runner.name:<26}{tok_s:>10,.0f}{reference / per_step:>16.2f}x{mfu:>8.2f}")


if __name__ == "__main__":
    main()
