"""Fine-tuning recipes as a RunSetup for the one loop: data, model, objective, validation and checkpoint files.

A recipe differs from pretraining only in what `prepare_finetune` hands the loop: the loader of its batches,
the objective computing a loss from them, the parameters that train (all, or a LoRA adapter's), how the
held-out set is scored, and which files a checkpoint holds (a causal LM, a PEFT adapter, a classifier)."""

from __future__ import annotations

from pathlib import Path

import torch

from foundry import hub
from foundry.core.errors import UserError
from foundry.train.config import TrainConfig, save_run_yaml
from foundry.train.finetune_config import FinetuneConfig, save_recipe, saved_recipe
from foundry.train.parallel.world import World
from foundry.train.setup import (RunSetup, _locate_run, _make_run_dir, join_world, local_batch_size, resume_history,
                                 uses_bf16)
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


def _locate_and_check(cfg: TrainConfig, ft: FinetuneConfig):
    run_dir, resume_from = _locate_run(cfg)
    history = resume_history(cfg, run_dir, resume_from)
    if resume_from is not None:
        recipe = saved_recipe(run_dir)
        if recipe and recipe != {k: v for k, v in ft.to_dict().items() if k in recipe}:
            changed = sorted(k for k in recipe if recipe[k] != getattr(ft, k))
            raise UserError(f"--resume: the recipe settings {', '.join(changed)} differ from the run's "
                            f"({run_dir}/recipe.yaml); a run keeps its recipe")
    return run_dir, resume_from, history


def _check_layout(cfg: TrainConfig, world: World) -> None:
    """Fine-tuning runs data-parallel as DDP replicas; sharded layouts are pretraining's for now."""
    if world.tp > 1 or world.ep > 1 or (world.dp > 1 and cfg.parallel == "fsdp"):
        raise UserError("foundry finetune trains across processes as DDP replicas (--parallel ddp, what auto means "
                        "here); --parallel fsdp, --tp and --ep are not built for the recipes yet: drop them")


def prepare_finetune(cfg: TrainConfig, ft: FinetuneConfig, notes: list[str] | None = None,
                     world: World | None = None) -> RunSetup:
    """Check every input, then build the run of a fine-tuning recipe; nothing is written before the checks pass.

    notes: lines worth showing the person (data counts, skipped lines, parameter and memory figures).
    world: the processes it trains in (default: join torchrun's, or this one alone); rank 0 writes the run."""
    notes = notes if notes is not None else []
    if not cfg.data:
        raise UserError("--data FILE.jsonl is required: the training records")
    world = world or join_world(cfg)
    _check_layout(cfg, world)
    run_dir, resume_from, history = world.run_on_main(lambda: _locate_and_check(cfg, ft))
    device = world.device
    local_batch_size(cfg, world)
    configure_fp32_matmul(cfg.fast_fp32, device)
    loaded = _starting_model(cfg, device)
    tokenizer = loaded.tokenizer
    if cfg.seq_len > loaded.config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                        f"({loaded.config.max_position_embeddings}); lower --seq-len")
    from foundry.train import recipes

    torch.manual_seed(cfg.seed)  # --seed draws the new weights (LoRA's A, a classifier's head) on every rank alike
    recipe = recipes.build(ft, cfg, loaded, device, resume_from, notes, shard=(world.dp_rank, world.dp))
    model = recipe.model
    world.run_on_main(lambda: _make_run_dir(run_dir, resume_from is not None))
    torch.manual_seed(cfg.seed)

    def write_settings() -> None:
        save_run_yaml(run_dir / "run.yaml", cfg, history)
        save_recipe(run_dir, ft)

    world.run_on_main(write_settings)
    summary = {"file": str(Path(cfg.data).resolve()), "train_records": recipe.train_count,
               "val_records": recipe.val_count, "skipped_lines": recipe.skipped,
               "tokenizer_fingerprint": tokenizer.fingerprint}
    return RunSetup(run_dir, device, uses_bf16(cfg, device), tokenizer, model, recipe.meta["total_parameters"],
                    recipe.loader, None, None, resume_from, summary, stage=f"finetune-{ft.recipe}",
                    objective=recipe.objective, validate=recipe.validate, write_model=recipe.write_model,
                    recipe=recipe, meta={"recipe": ft.to_dict(), "base_model": str(loaded.path), **recipe.meta},
                    world=world, data_parallel="ddp")

