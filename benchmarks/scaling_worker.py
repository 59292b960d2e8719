"""torchrun worker of benchmarks/scaling.py: how much of a data-parallel training step is communication.

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/scaling_worker.py \
        --data DATA_DIR [--model mini] [--batch-size 8] [--seq-len 256] [--rounds 3] [--steps 2] [--json OUT]

Every rank builds the pretraining model exactly as `foundry pretrain` does (the preset sized to the data's
tokenizer, `foundry.train.parallel.apply.parallelize` laying it out) and trains on its own shard of the data
(--batch-size is over all ranks). For each layout it times forward + backward with gradient synchronisation
on and off, in alternating rounds, and the optimizer step separately (measured with synchronisation on: under
FSDP a step without it leaves the sharded parameters no gradients to update). A step's time is the slowest
rank's (the step ends when every rank has its gradients), the median over the timed steps.

    share = 1 - t_off / t_on,   t_on = forward+backward(synchronised) + optimizer,
                                t_off = forward+backward(unsynchronised) + optimizer

DDP, off: `no_sync()` skips the gradient all-reduce, so share is what the all-reduce adds to a step beyond
what it hides behind the backward pass. FSDP2, off: `set_requires_gradient_sync(False)` skips the gradients'
reduce-scatter only; the parameters' all-gathers (forward, and backward again: reshard after forward) still
run, so its share leaves them out. Layout "none" (every rank an unwrapped model, no collective at all) gives
the step with no communication, under the same contention for the cores: 1 - t_none / t_on bounds all of a
layout's communication and wrapping cost, all-gathers included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from foundry.data.loader import BatchLoader
from foundry.data.shards import TokenShards
from foundry.hub import resolve_model_source
from foundry.model import Transformer
from foundry.tokenizer import Tokenizer
from foundry.train.loss import CausalLMLoss
from foundry.train.parallel.apply import parallelize
from foundry.train.parallel.world import World, start_world
from foundry.train.speed import configure_fp32_matmul

LAYOUTS = ("none", "ddp", "fsdp")


def build_model(model: str, tokenizer: Tokenizer, seed: int) -> Transformer:
    """The preset sized to the tokenizer and initialised as `foundry pretrain` does (train/setup.py)."""
    config, _ = resolve_model_source(model)
    config = config.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(seed)
    net = Transformer(config)
    net.init_weights(seed)
    net.train()
    return net


def sync_switch(layout: str, objective: torch.nn.Module, model: torch.nn.Module) -> Callable[[bool], Any]:
    """A function of `sync` returning the context a forward+backward runs in, as the training loop does."""
    def switch(sync: bool) -> Any:
        if layout == "ddp" and not sync:
            return objective.no_sync()
        if layout == "fsdp":
            model.set_requires_gradient_sync(sync)
        return nullcontext()
    return switch


def slowest(seconds: list[float]) -> list[float]:
    """Each timed step's time on the slowest rank."""
    tensor = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def time_layout(layout: str, args: argparse.Namespace, world: World, tokenizer: Tokenizer,
                loader: BatchLoader) -> dict[str, Any]:
    """Median seconds of forward+backward with synchronisation on / off and of the optimizer step, for one layout."""
    model = build_model(args.model, tokenizer, args.seed)
    objective = parallelize(model, CausalLMLoss(model), world, layout, activation_checkpointing="off",
                            compile=False, bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    switch = sync_switch(layout, objective, model)
    modes = (True,) if layout == "none" else (True, False)
    times: dict[str, list[float]] = {"on": [], "off": [], "optimizer": []}

    def step(sync: bool, record: bool) -> None:
        x, y = next(loader)
        dist.barrier()  # every rank starts together: no rank's wait for another is timed as its own work
        began = time.perf_counter()
        with switch(sync):
            objective(x, y).backward()
        backward_done = time.perf_counter()
        if sync:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if record:
            times["on" if sync else "off"].append(backward_done - began)
            if sync:
                times["optimizer"].append(time.perf_counter() - backward_done)

    for sync in modes:  # warm-up: allocator, oneDNN primitives, DDP's bucket rebuild, FSDP's lazy init
        for _ in range(args.warmup):
            step(sync, record=False)
    for round_ in range(args.rounds):
        for sync in modes if round_ % 2 == 0 else modes[::-1]:
            for _ in range(args.steps):
                step(sync, record=True)
    median = {name: statistics.median(slowest(values)) for name, values in times.items() if values}
    t_on = median["on"] + median["optimizer"]
    result = {"layout": layout, "forward_backward_synced_s": median["on"], "optimizer_s": median["optimizer"],
              "step_s": t_on, "timed_steps_per_mode": args.rounds * args.steps}
    if "off" in median:
        t_off = median["off"] + median["optimizer"]
        result.update(forward_backward_unsynced_s=median["off"], step_unsynced_s=t_off, share=1 - t_off / t_on)
    return result


def main() -> None:
    """Time every layout on this rank's shard; rank 0 writes the results (--json) and prints one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="token-shard directory (with its tokenizer/)")
    parser.add_argument("--model", default="mini")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step over all ranks")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of synchronised/unsynchronised steps")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before the rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated, of none, ddp, fsdp")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    world = start_world("cpu")
    if not world.distributed:
        raise SystemExit("scaling_worker.py: start it under torchrun with at least 2 processes")
    configure_fp32_matmul("auto", world.device)  # what `foundry pretrain` sets (--fast-fp32 auto)
    tokenizer = Tokenizer.load(Path(args.data) / "tokenizer")
    shards = TokenShards(args.data, "train", tokenizer=tokenizer)
    loader = BatchLoader(shards, args.batch_size // world.dp, args.seq_len, args.seed, rank=world.dp_rank,
                         world_size=world.dp)
    results = [time_layout(layout, args, world, tokenizer, loader) for layout in args.layouts.split(",")]
    if world.is_main:
        report = {"world_size": world.size, "threads_per_process": torch.get_num_threads(),
                  "tokens_per_step": world.dp * (args.batch_size // world.dp) * args.seq_len, "layouts": results}
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        print(json.dumps(report))
    world.close()


if __name__ == "__main__":
    main()
