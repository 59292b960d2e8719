"""Fine-tuning recipes as a RunSetup for the one loop: data, model, objective, validation and checkpoint files.

A recipe differs from pretraining only in what `prepare_finetune` hands the loop: the loader of its batches,
the objective computing a loss from them, the parameters that train (all, or a LoRA adapter's), how the
held-out set is scored, and which files a checkpoint holds (a causal LM, a PEFT adapter, a classifier)."""

from __future__ import annotations

from pathlib import Path

import torch

from foundry import hub
from foundry.core.errors import UserError
from foundry.hub.device import resolve_device
from foundry.train.config import TrainConfig, save_run_yaml
from foundry.train.finetune_config import FinetuneConfig, save_recipe, saved_recipe
from foundry.train.setup import RunSetup, _locate_run, _make_run_dir, resume_history, uses_bf16
from foundry.train.speed import configure_fp32_matmul


def _starting_model(cfg: TrainConfig, device: torch.device):
    """The starting model directory, loaded in fp32 with its tokenizer."""
    if not cfg.model:
        raise UserError("MODEL is required: the model directory (or run directory) to fine-tune")
    loaded = hub.load(cfg.model, device=device, dtype=torch.float32)
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.path} has no tokenizer.json: fine-tuning reads text, so the model "
                        f"directory needs its tokenizer")
    return loaded


def prepare_finetune(cfg: TrainConfig, ft: FinetuneConfig, notes: list[str] | None = None) -> RunSetup:
    """Check every input, then build the run of a fine-tuning recipe; nothing is written before the checks pass.

    notes: lines worth showing the person (data counts, skipped lines, parameter and memory figures)."""
    notes = notes if notes is not None else []
    if not cfg.data:
        raise UserError("--data FILE.jsonl is required: the training records")
    run_dir, resume_from = _locate_run(cfg)
    history = resume_history(cfg, run_dir, resume_from)
    if resume_from is not None:
        recipe = saved_recipe(run_dir)
        if recipe and recipe != {k: v for k, v in ft.to_dict().items() if k in recipe}:
            changed = sorted(k for k in recipe if recipe[k] != getattr(ft, k))
            raise UserError(f"--resume: the recipe settings {', '.join(changed)} differ from the run's "
                            f"({run_dir}/recipe.yaml); a run keeps its recipe")
    device = resolve_device(cfg.device)
    configure_fp32_matmul(cfg.fast_fp32, device)
    loaded = _starting_model(cfg, device)
    tokenizer = loaded.tokenizer
    if cfg.seq_len > loaded.config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                        f"({loaded.config.max_position_embeddings}); lower --seq-len")
    from foundry.train import recipes

    recipe = recipes.build(ft, cfg, loaded, device, resume_from, notes)
    model = recipe.model
    _make_run_dir(run_dir, resume_from is not None)
    torch.manual_seed(cfg.seed)
    save_run_yaml(run_dir / "run.yaml", cfg, history)
    save_recipe(run_dir, ft)
    summary = {"file": str(Path(cfg.data).resolve()), "train_records": recipe.train_count,
               "val_records": recipe.val_count, "skipped_lines": recipe.skipped,
               "tokenizer_fingerprint": tokenizer.fingerprint}
    return RunSetup(run_dir, device, uses_bf16(cfg, device), tokenizer, model, recipe.meta["total_parameters"],
                    recipe.loader, None, None, resume_from, summary, stage=f"finetune-{ft.recipe}",
                    objective=recipe.objective, validate=recipe.validate, write_model=recipe.write_model,
                    recipe=recipe, meta={"recipe": ft.to_dict(), "base_model": str(loaded.path), **recipe.meta})

