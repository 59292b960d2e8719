"""`foundry demo`: the whole life cycle in a few minutes on the embedded stdlib corpus."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console

from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError

PROMPT = "def fibonacci(n):"
# What a user would ask for from a small code model: a little below temperature 1 with a nucleus cut, so
# the sample keeps to likely tokens, and a mild repetition penalty against the loops a small model falls
# into (mild, because code repeats its names on purpose). It stops where the function would end.
SAMPLING = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=0)
SAMPLE_STOP = ["\ndef ", "\nclass ", "\n\n\n"]


def run_demo(out: str | Path, time_budget: float | None = 300.0, preset_name: str = "mini",
             overwrite: bool = False, vocab_size: int = 8192, *, steps: int | None = None,
             corpus: Sequence[str] = ("stdlib",), batch_size: int = 16, seq_len: int = 256,
             sample_tokens: int = 96) -> dict:
    """Tokenizer -> shards -> pretraining -> evaluation -> sample; returns the figures it printed.

    `steps` trains exactly that many steps instead of fitting the run to `time_budget` seconds."""
    from foundry.cli.progress import ConsoleTrainReporter, PrepareBar
    from foundry.data.corpus import train_tokenizer
    from foundry.data.shards import prepare
    from foundry.infer.engine import Engine
    from foundry.infer.sampling import SamplingParams
    from foundry import hub
    from foundry.train.config import TrainConfig
    from foundry.train.loop import train

    if steps is not None and steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}")
    if steps is None and not (time_budget and time_budget > 0):
        raise UserError(f"--time-budget must be positive seconds, got {time_budget}")
    console = Console()
    out, corpus = Path(out), list(corpus)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} already holds files; pass --overwrite or choose another --out")
        if not (out / "run").exists() and not (out / "tokenizer").exists():
            raise UserError(f"{out} does not look like a demo directory; refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    what = "the stdlib corpus" if corpus == ["stdlib"] else ", ".join(corpus)

    console.rule(f"[bold]1. tokenizer: byte-level BPE on {what}")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(corpus, vocab_size, out / "tokenizer")
    console.print(f"{tokenizer.vocab_size} tokens in {time.perf_counter() - t0:.1f}s -> {out / 'tokenizer'}")

    console.rule("[bold]2. data: token shards")
    with PrepareBar() as bar:
        meta = prepare(corpus, tokenizer, out / "data", progress=bar)
    console.print(f"train {meta['tokens']['train']:,} tokens, validation {meta['tokens']['val']:,} tokens "
                  f"-> {out / 'data'}")

    length = f"{steps} steps" if steps else f"about {time_budget:.0f}s"
    console.rule(f"[bold]3. pretraining preset {preset_name!r} for {length}")
    cfg = TrainConfig(model=preset_name, data=str(out / "data"), out=str(out / "run"),
                      tokenizer=str(out / "tokenizer"), steps=steps or 100_000,
                      time_budget=None if steps else time_budget,
                      batch_size=batch_size, seq_len=seq_len, lr=3e-3, warmup=30, eval_every=30, eval_batches=8,
                      save_every=0, log_every=5)
    t0 = time.perf_counter()
    result = train(cfg, ConsoleTrainReporter())
    train_seconds = time.perf_counter() - t0
    tokens = result.step * cfg.tokens_per_step

    console.rule("[bold]4. evaluation")
    val, base = result.val, result.baseline
    console.print(f"{result.step:,} steps, {tokens:,} tokens in {train_seconds:.0f}s")
    console.print(f"validation loss {val.loss:.3f} nats/token, perplexity {val.perplexity:.1f}")
    console.print(f"unigram baseline loss {base.loss:.3f}, perplexity {base.perplexity:.1f} "
                  f"({base.perplexity / val.perplexity:.1f}x higher)")
    console.print(f"model directory: {result.checkpoint}")
    console.print(f"loss curve: {result.run_dir / 'loss.png'}")
    if (result.run_dir / "expert_load.png").is_file():  # a mixture-of-experts preset (moe-tiny)
        console.print(f"expert load: {result.run_dir / 'expert_load.png'}")

    console.rule("[bold]5. a sample")
    loaded = hub.load(result.checkpoint)
    engine = Engine(loaded.model, loaded.tokenizer)
    params = SamplingParams(max_new_tokens=sample_tokens, stop=SAMPLE_STOP, **SAMPLING)
    completion = engine.generate([PROMPT], params)[0]
    settings = ", ".join(f"{k} {v}" for k, v in SAMPLING.items())
    console.print(f"[dim]{settings}, at most {sample_tokens} tokens[/dim]")
    print(PROMPT + completion.text, flush=True)  # as generated: rich would wrap long lines and expand tabs
    wall = time.perf_counter() - started
    console.rule(f"done in {wall:.0f}s")
    # Plain print: rich would wrap the path. A code model: its playground's Completions tab is the one to use.
    print(f"try it in a browser: foundry serve {result.checkpoint}, then open http://127.0.0.1:8000/ "
          f"(Completions: this is a code model, not a chat model)", flush=True)
    return {"val_loss": val.loss, "val_ppl": val.perplexity, "baseline_loss": base.loss,
            "baseline_ppl": base.perplexity, "steps": result.step, "tokens": tokens,
            "train_seconds": train_seconds, "wall_seconds": wall, "checkpoint": str(result.checkpoint),
            "sample": completion.text, "sample_token_ids": completion.token_ids}


def _cmd_demo(args: argparse.Namespace) -> None:
    if args.recipe == "sft":
        from foundry.cli.demo_finetune import run_finetune_demo

        run_finetune_demo(args.out if args.out != "demo-out" else "demo-sft-out", overwrite=args.overwrite)
        return
    run_demo(args.out, time_budget=args.time_budget, preset_name=args.model, overwrite=args.overwrite,
             steps=args.steps, corpus=args.corpus or ["stdlib"])


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` verb."""
    p = add_verb(sub, "demo", _cmd_demo, "Tokenizer, data, pretraining, evaluation and a sample, on the stdlib corpus.")
    p.add_argument("--out", default="demo-out", help="directory for everything the demo writes")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of pretraining")
    p.add_argument("--steps", type=int, default=None,
                   help="train exactly this many steps instead of fitting the run to --time-budget")
    p.add_argument("--model", default="mini", help="preset to pretrain (moe-tiny: a mixture of experts)")
    p.add_argument("--corpus", nargs="+", default=None, metavar="SOURCE",
                   help="what to train on: stdlib, stdlib-all (generated data modules too), files or "
                        "directories (default: stdlib)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--recipe", choices=("pretrain", "sft"), default="pretrain",
                   help="pretrain: the life cycle above; sft: fine-tune a small model on an embedded task and show "
                        "held-out exact match before and after (out: demo-sft-out)")
