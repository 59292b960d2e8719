"""`foundry demo`: the whole life cycle in a few minutes on the embedded stdlib corpus."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from rich.console import Console

from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError

PROMPT = "def fibonacci(n):"


def run_demo(out: str | Path, time_budget: float = 300.0, preset_name: str = "mini",
             overwrite: bool = False, vocab_size: int = 8192) -> dict:
    """Tokenizer -> shards -> pretraining -> evaluation -> sample; returns the figures it printed."""
    from foundry.cli.progress import ConsoleTrainReporter, PrepareBar
    from foundry.data.corpus import train_tokenizer
    from foundry.data.shards import prepare
    from foundry.infer.engine import Engine
    from foundry.infer.sampling import SamplingParams
    from foundry import hub
    from foundry.train.config import TrainConfig
    from foundry.train.loop import train

    console = Console()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} already holds files; pass --overwrite or choose another --out")
        if not (out / "run").exists() and not (out / "tokenizer").exists():
            raise UserError(f"{out} does not look like a demo directory; refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    console.rule("[bold]1. tokenizer: byte-level BPE on the stdlib corpus")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(["stdlib"], vocab_size, out / "tokenizer")
    console.print(f"{tokenizer.vocab_size} tokens in {time.perf_counter() - t0:.1f}s -> {out / 'tokenizer'}")

    console.rule("[bold]2. data: token shards")
    with PrepareBar() as bar:
        meta = prepare(["stdlib"], tokenizer, out / "data", progress=bar)
    console.print(f"train {meta['tokens']['train']:,} tokens, validation {meta['tokens']['val']:,} tokens "
                  f"-> {out / 'data'}")

    console.rule(f"[bold]3. pretraining preset {preset_name!r} for about {time_budget:.0f}s")
    cfg = TrainConfig(model=preset_name, data=str(out / "data"), out=str(out / "run"),
                      tokenizer=str(out / "tokenizer"), steps=100_000, batch_size=16, seq_len=256,
                      lr=3e-3, warmup=30, eval_every=30, eval_batches=8, save_every=0,
                      time_budget=time_budget, log_every=5)
    result = train(cfg, ConsoleTrainReporter())

    console.rule("[bold]4. evaluation")
    val, base = result.val, result.baseline
    console.print(f"validation loss {val.loss:.3f} nats/token, perplexity {val.perplexity:.1f}")
    console.print(f"unigram baseline loss {base.loss:.3f}, perplexity {base.perplexity:.1f} "
                  f"({base.perplexity / val.perplexity:.1f}x higher)")
    console.print(f"model directory: {result.checkpoint}")
    console.print(f"loss curve: {result.run_dir / 'loss.png'}")

    console.rule("[bold]5. a sample")
    loaded = hub.load(result.checkpoint)
    engine = Engine(loaded.model, loaded.tokenizer)
    completion = engine.generate([PROMPT], SamplingParams(max_new_tokens=80, temperature=0.6, top_k=40, seed=0))[0]
    console.print(PROMPT + completion.text, highlight=False, markup=False)
    console.rule(f"done in {time.perf_counter() - started:.0f}s")
    return {"val_loss": val.loss, "val_ppl": val.perplexity, "baseline_loss": base.loss,
            "baseline_ppl": base.perplexity, "checkpoint": str(result.checkpoint), "sample": completion.text}


def _cmd_demo(args: argparse.Namespace) -> None:
    run_demo(args.out, time_budget=args.time_budget, preset_name=args.model, overwrite=args.overwrite)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` verb."""
    p = add_verb(sub, "demo", _cmd_demo, "Tokenizer, data, pretraining, evaluation and a sample, on the stdlib corpus.")
    p.add_argument("--out", default="demo-out", help="directory for everything the demo writes")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of pretraining (default 300)")
    p.add_argument("--model", default="mini", help="preset to pretrain (default mini)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
