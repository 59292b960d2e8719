"""FinetuneConfig: what a fine-tuning recipe adds to a run's TrainConfig (data form, LoRA, DPO, classes).

The loop's own settings (steps, batch size, learning rate, checkpoints, ...) stay in TrainConfig; for
`foundry finetune`, TrainConfig.data is the training JSONL and TrainConfig.model the starting model
directory. Fields carry their --help text like TrainConfig's, so the flags are derived from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundry.core.errors import UserError
from foundry.core.files import atomic_file
from foundry.train.config import _setting, flag_name

RECIPES = ("sft", "classify", "dpo")

# Settings of the loop that suit fine-tuning better than pretraining's defaults (flags still override them).
FINETUNE_DEFAULTS: dict[str, Any] = {"steps": 200, "lr": 3e-4, "warmup": 10, "eval_every": 50, "eval_batches": 0,
                                     "save_every": 0, "batch_size": 8, "seq_len": 512, "weight_decay": 0.0,
                                     "log_every": 5}


@dataclass
class FinetuneConfig:
    """A fine-tuning recipe and its options."""

    recipe: str = _setting("sft", "sft (instructions / chat), classify (a label per text) or dpo (preference "
                           "pairs)", choices=RECIPES)
    val: str | None = _setting(None, "held-out JSONL in the same form as --data", shown="--val-fraction of --data",
                               metavar="FILE.jsonl")
    val_fraction: float = _setting(0.1, "share of --data held out for validation when --val is not given (0: none)")
    train_on_prompt: bool = _setting(False, "sft: train on every token, not only the assistant's")
    packing: bool = _setting(True, "sft: pack short examples into each row (attention never crosses examples)")
    show_example: bool = _setting(False, "print the first training example with its trained tokens marked")
    skip_bad_lines: bool = _setting(False, "skip malformed JSONL lines (and count them) instead of stopping")
    lora: bool = _setting(False, "train a LoRA adapter instead of every weight (saved in the PEFT layout)")
    lora_rank: int = _setting(8, "LoRA rank r")
    lora_alpha: float = _setting(16.0, "LoRA alpha (the update is scaled by alpha / r, or alpha / sqrt(r) "
                                 "with --rslora)")
    lora_dropout: float = _setting(0.0, "dropout on the LoRA branch's input")
    rslora: bool = _setting(False, "rank-stabilised LoRA scaling alpha / sqrt(r)")
    lora_targets: str = _setting("all-linear", "comma-separated module names (q_proj,v_proj), `re:REGEX` "
                                 "patterns, or all-linear (every linear but the output head)", metavar="NAMES")
    qlora: bool = _setting(False, "QLoRA: hold the frozen base in --qlora-dtype, train the adapter in fp32 "
                           "(implies --lora)")
    qlora_dtype: str = _setting("int8", "the frozen base's storage for --qlora", choices=("int8", "nf4"))
    beta: float = _setting(0.1, "dpo: the KL strength beta")
    ref: str | None = _setting(None, "dpo: the frozen reference model directory", shown="the starting weights",
                               metavar="DIR")
    class_weights: str = _setting("none", "classify: weight the loss by inverse class frequency (balanced)",
                                  choices=("none", "balanced"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{flag_name(f.name)} must be {', '.join(choices[:-1])} or {choices[-1]}, "
                                f"got {getattr(self, f.name)!r}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.lora_rank < 1:
            raise UserError(f"--lora-rank must be a positive whole number, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.beta <= 0:
            raise UserError(f"--beta must be positive, got {self.beta}")
        if self.qlora:
            self.lora = True
        if self.ref is not None and self.recipe != "dpo":
            raise UserError("--ref is the DPO reference model: it only applies with --recipe dpo")

    @property
    def targets(self) -> list[str]:
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPE_FILE = "recipe.yaml"  # in the run directory, beside run.yaml


def save_recipe(run_dir: Path, ft: FinetuneConfig) -> None:
    """Write the recipe's settings atomically beside run.yaml (a resumed run reads them back)."""
    import yaml

    with atomic_file(run_dir / RECIPE_FILE, "w") as handle:
        yaml.safe_dump(ft.to_dict(), handle, sort_keys=False)


def saved_recipe(run_dir: Path) -> dict[str, Any]:
    """The recipe settings a run was started with (empty if it has none)."""
    import yaml

    path = run_dir / RECIPE_FILE
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return {name: value for name, value in data.items() if name in known}
