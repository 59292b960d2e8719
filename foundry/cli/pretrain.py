"""`foundry pretrain`: training settings from --config RUN.yaml and flags, then the one training loop."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from foundry.cli.parsing import add_verb

if TYPE_CHECKING:
    from foundry.train.config import TrainConfig


_TRAIN_FLAGS = {  # flag -> (type, help); every one defaults to the TrainConfig field (or --config)
    "steps": (int, "optimizer steps in the whole run; a resumed run continues up to it"),
    "batch-size": (int, "sequences per micro-batch"),
    "seq-len": (int, "tokens per sequence"),
    "grad-accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "warmup": (int, "linear warm-up steps"),
    "weight-decay": (float, "AdamW weight decay"),
    "grad-clip": (float, "gradient-norm clipping threshold"),
    "seed": (int, "seed for initialisation and data order"),
    "eval-every": (int, "steps between validation evaluations (0: only at the end)"),
    "eval-batches": (int, "validation batches per periodic evaluation (0: the whole split)"),
    "final-eval-batches": (int, "validation batches at the end of the run (0: the whole split)"),
    "save-every": (int, "steps between checkpoints (0: only at the end)"),
    "keep-checkpoints": (int, "complete checkpoints to keep (0: all)"),
    "log-every": (int, "steps between metric lines"),
    "time-budget": (float, "seconds: fit --steps to this budget after timing the first steps"),
    "precision": (str, "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16"),
    "fast-fp32": (str, "oneDNN fp32 matmuls on CPU: auto (only where exact), on, off"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "tokenizer": (str, "tokenizer directory (default: the one stored in DATA_DIR)"),
}


def train_config_from_args(args: argparse.Namespace) -> "TrainConfig":
    """TrainConfig from --config YAML (if any) overridden by the flags given on the command line."""
    from foundry.train.config import TrainConfig

    settings = TrainConfig.from_yaml(args.config) if args.config else {}
    for name in ("model", "data", "out", *(f.replace("-", "_") for f in _TRAIN_FLAGS),
                 "compile", "activation_checkpointing", "resume", "overwrite"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    return TrainConfig(**settings)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from foundry.cli.progress import ConsoleTrainReporter
    from foundry.train.loop import train

    result = train(train_config_from_args(args), ConsoleTrainReporter())
    print(f"checkpoint: {result.checkpoint}")
    if result.val is not None:
        print(f"validation loss {result.val.loss:.4f}  perplexity {result.val.perplexity:.2f}  "
              f"(unigram baseline {result.baseline.loss:.4f} / {result.baseline.perplexity:.1f})")
    return 130 if result.interrupted else 0


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="preset, model config YAML, model directory or run directory")
    p.add_argument("--data", help="DATA_DIR written by `foundry prepare`")
    p.add_argument("--out", help="RUN_DIR for checkpoints, metrics and the loss plot")
    p.add_argument("--config", help="RUN.yaml of training settings; flags override it")
    for flag, (kind, text) in _TRAIN_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, default=None, help=text)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass to save memory")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace the run in --out")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `pretrain` verb."""
    p = add_verb(sub, "pretrain", _cmd_pretrain, "Pretrain a model on token shards.")
    _add_train_flags(p)
