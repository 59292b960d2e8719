"""`foundry demo --recipe sft`: a complete specialisation in about a minute, with scores before and after.

The embedded task: upper-case three letters ("upper: f o x" -> "F O X"). A small model that has never seen it
(random initialisation, a BPE trained on the stdlib) is fine-tuned on 1,500 triples through `foundry finetune`'s
own code, then scored by exact match on 100 triples it never saw."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from rich.console import Console

from foundry.core.errors import UserError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TRAIN, HELD_OUT = 1500, 100


def upper_task(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training, held-out) conversations of the embedded task; no triple is in both."""
    triples = [(a, b, c) for a in LETTERS for b in LETTERS for c in LETTERS]
    random.Random(seed).shuffle(triples)
    records = [{"messages": [{"role": "user", "content": "upper: " + " ".join(t)},
                             {"role": "assistant", "content": " ".join(t).upper()}]} for t in triples]
    return records[HELD_OUT:HELD_OUT + TRAIN], records[:HELD_OUT]


def small_base(out: Path) -> Path:
    """out/base: a random-init 4-layer Llama (hidden 128) with a 2,048-token BPE trained on the stdlib."""
    from foundry import hub
    from foundry.config import ModelConfig
    from foundry.data.corpus import train_tokenizer
    from foundry.model import Transformer

    tokenizer = train_tokenizer(["stdlib"], 2048, out / "tokenizer", overwrite=True)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=384, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                         pad_token_id=tokenizer.pad_id)
    model = Transformer(config)
    model.init_weights(seed=0)
    return hub.save(out / "base", model, tokenizer)


def run_finetune_demo(out: str | Path, overwrite: bool = False, steps: int = 300) -> dict:
    """Tokenizer -> a random base model -> the task's JSONL -> sft -> exact match before and after."""
    from foundry import hub
    from foundry.cli.progress import ConsoleTrainReporter
    from foundry.cli.recipe_report import greedy_answers, print_recipe_report
    from foundry.train.config import TrainConfig
    from foundry.train.finetune import prepare_finetune
    from foundry.train.finetune_config import FinetuneConfig
    from foundry.train.loop import train

    console, out, started = Console(), Path(out), time.perf_counter()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} already holds files; pass --overwrite or choose another --out")
        if not (out / "base").exists():
            raise UserError(f"{out} does not look like a fine-tuning demo directory; refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    console.rule("[bold]1. a base model that has never seen the task")
    base = small_base(out)
    loaded = hub.load(base)
    tokenizer = loaded.tokenizer
    console.print(f"{loaded.config.num_params():,} parameters, random init -> {base}")

    console.rule("[bold]2. the task: upper-case three letters")
    train_records, held_out = upper_task()
    for name, records in (("train", train_records), ("held_out", held_out)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    console.print(f"{len(train_records):,} training conversations -> {out / 'train.jsonl'}; {len(held_out)} held out "
                  f"-> {out / 'held_out.jsonl'}")
    console.print(f"e.g. {held_out[0]['messages'][0]['content']!r} -> {held_out[0]['messages'][1]['content']!r}")

    console.rule(f"[bold]3. foundry finetune --recipe sft ({steps} steps)")
    cfg = TrainConfig(model=str(base), data=str(out / "train.jsonl"), out=str(out / "run"), steps=steps, batch_size=8,
                      seq_len=64, lr=3e-3, warmup=10, eval_every=100, eval_batches=0, save_every=0, log_every=10,
                      weight_decay=0.0)
    ft = FinetuneConfig(recipe="sft", val=str(out / "held_out.jsonl"))
    reporter, notes = ConsoleTrainReporter(), []
    setup = prepare_finetune(cfg, ft, notes)
    for line in notes:
        reporter.note(line)
    result = train(cfg, reporter, setup)

    console.rule("[bold]4. held-out exact match, before and after")
    figures = print_recipe_report(cfg, ft, setup, result)
    prompt = held_out[1]["messages"][:1]
    answer = greedy_answers(setup.model, tokenizer, [prompt], 12)[0]
    console.print(f"{prompt[0]['content']!r} -> {answer.strip()!r}")
    console.print(f"fine-tuned model: {result.checkpoint}; loss curve: {result.run_dir / 'loss.png'}")
    console.rule(f"done in {time.perf_counter() - started:.0f}s")
    return {**figures, "checkpoint": str(result.checkpoint)}
