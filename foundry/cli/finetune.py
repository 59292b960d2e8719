"""`foundry finetune MODEL --data FILE.jsonl --recipe sft|classify|dpo --out RUN_DIR`: one loop, three recipes."""

from __future__ import annotations

import argparse
import dataclasses

from foundry.cli.launch import add_launch_flags, launch, wants_launch
from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError
from foundry.cli.pretrain import add_settings_flags, restarted_job_resumes, summary_lines
from foundry.train.config import TrainConfig
from foundry.train.finetune_config import FINETUNE_DEFAULTS, FinetuneConfig, saved_recipe

EPILOG = """\
Examples (small format samples of each JSONL form are in examples/):

  foundry finetune base-model --recipe sft --data examples/sft_messages.jsonl --out runs/sft

  foundry finetune base-model --recipe sft --lora --lora-rank 16 --data examples/sft_prompt_completion.jsonl \
--out runs/sft-lora

  foundry finetune base-model --recipe classify --data examples/classify.jsonl --class-weights balanced \
--out runs/fraud

  foundry finetune base-model --recipe dpo --lora --beta 0.1 --data examples/dpo.jsonl --out runs/dpo

sft reads {"messages": [...]} (OpenAI chat format) or {"prompt", "completion"} records and trains on the \
assistant's tokens (end-of-turn included); classify reads {"text", "label"}; dpo reads {"prompt", "chosen", \
"rejected"}. Each run directory holds checkpoints (a model directory, or a PEFT adapter with --lora), \
metrics.jsonl and loss.png; `foundry merge BASE ADAPTER --out DIR` folds an adapter into a model directory. \
--resume continues a run as `foundry pretrain --resume` does.
"""

_OWN_HELP = {"data": "the training records: a JSONL file in the recipe's form",
             "seq_len": "tokens per row (at most the model's context, which is the default when shorter)",
             "out": "the run directory: checkpoints, metrics.jsonl, loss.png, run.yaml, recipe.yaml"}


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, FinetuneConfig]:
    """TrainConfig (finetune's defaults, then the flags given) and FinetuneConfig from the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    given["model"] = args.model
    restarted_job_resumes(given)
    recipe = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)
              if getattr(args, f.name) is not None}
    if given.get("resume"):
        from pathlib import Path

        from foundry.train.setup import resume_config

        saved = saved_recipe(Path(given.get("out", "")))
        return resume_config(given), FinetuneConfig(**{**saved, **recipe})
    defaults = dict(FINETUNE_DEFAULTS)
    from foundry.train.vision import vision_kind

    if vision_kind(args.model) is not None:  # images: the model's tokens per image set seq_len
        return TrainConfig(**{**defaults, **given}), FinetuneConfig(**recipe)
    if "seq_len" not in given:  # rows as long as finetune's default, or the model's whole context if shorter
        from foundry.hub import resolve_model_source

        config, _ = resolve_model_source(args.model)
        defaults["seq_len"] = min(defaults["seq_len"], config.max_position_embeddings)
    return TrainConfig(**{**defaults, **given}), FinetuneConfig(**recipe)


def _cmd_finetune(args: argparse.Namespace) -> int:
    if wants_launch(args):
        return launch("finetune", args.verb_argv, args.nproc, args.max_restarts, args.out)
    from foundry.cli.progress import ConsoleTrainReporter
    from foundry.cli.recipe_report import print_recipe_report
    from foundry.train.finetune import prepare_finetune
    from foundry.train.loop import train
    from foundry.train.parallel.world import is_main_process
    from foundry.train.progress import TrainReporter

    cfg, ft = configs_from_args(args)
    from foundry.train.vision import vision_kind

    kind = vision_kind(cfg.model)
    if kind is not None:
        if kind != "classify" or ft.recipe != "classify":
            raise UserError(f"{cfg.model} is a {'ViT' if kind == 'classify' else 'DiT'}: fine-tune a ViT with "
                            f"--recipe classify on labelled images; a DiT trains on with `foundry pretrain "
                            f"--model DIT_DIR`")
        if ft.lora or ft.qlora or ft.val:
            raise UserError("a ViT fine-tunes every weight on --data with --val-fraction held out: --lora, "
                            "--qlora and --val are for the language models")
        from foundry.cli.vision import train_vision

        return train_vision(cfg, ft.val_fraction, "finetune-classify")
    main_rank = is_main_process()  # the other ranks of a distributed run train silently
    reporter = ConsoleTrainReporter() if main_rank else TrainReporter()
    notes: list[str] = []
    setup = prepare_finetune(cfg, ft, notes)
    for line in notes:
        reporter.note(line)
    result = train(cfg, reporter, setup)
    if not main_rank:
        return 130 if result.interrupted else 0
    print("\n".join(summary_lines(result)), flush=True)
    if not result.interrupted:
        print_recipe_report(cfg, ft, setup, result)  # rank 0's replica: DDP keeps a whole model on every rank
    return 130 if result.interrupted else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `finetune` verb."""
    p = add_verb(sub, "finetune", _cmd_finetune, "Fine-tune a model on your JSONL: instructions (sft), labels "
                 "(classify) or preference pairs (dpo), fully or with LoRA / QLoRA.")
    p.epilog = EPILOG
    p.add_argument("model", metavar="MODEL", help="the model directory (or run directory) to start from")
    add_settings_flags(p, FinetuneConfig)
    # --val-fraction is the recipe's (FinetuneConfig), for texts and images alike.
    add_settings_flags(p, TrainConfig, skip=("model", "tokenizer", "val_fraction"), defaults=FINETUNE_DEFAULTS,
                       helps=_OWN_HELP)
    add_launch_flags(p)
