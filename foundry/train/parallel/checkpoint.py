"""Checkpoints of sharded runs (FSDP, tensor parallel): each rank writes its own share of the weights and optimizer
state with torch.distributed.checkpoint; rank 0 writes the rest of the directory and publishes it.

The directory is built under a temp name and renamed into place only once every rank's share is on disk, then
`latest` points at it, exactly as a one-process checkpoint: a job killed half-way leaves only a temp directory,
which the next start removes, and never a checkpoint that looks complete. The run directory must be on a file
system every rank sees (as torchrun jobs across machines need anyway).

Resuming reads a sharded checkpoint at any world size and layout (DCP reshards); a one-process or DDP checkpoint
(full weights, an ordinary model directory) resumes sharded too: every rank loads the full weights before they
are sharded, and the saved optimizer state is handed over by parameter name.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from foundry.core.files import new_temp_dir, publish_dir
from foundry.hub.directory import write_model_metadata
from foundry.hub.sharded import DCP_DIR, MODEL_KEY, OPTIMIZER_KEY
from foundry.train.checkpoint import (
    checkpoint_name,
    latest_name,
    publish_latest,
    remove_stale,
    write_trainer_state,
)
from foundry.train.parallel.world import World


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            tokenizer: Any, trainer_state: dict[str, Any], meta: dict[str, Any], keep: int,
                            world: World) -> Path:
    """Write step-N/ with every rank's shard under dcp/, then publish it (collective: every rank calls it)."""
    name = checkpoint_name(step)
    final = run_dir / name

    def begin() -> str | None:
        if final.exists():
            if latest_name(run_dir) == name:
                return None
            remove_stale(run_dir, name)
        return str(new_temp_dir(final))

    tmp = world.run_on_main(begin)
    if tmp is None:
        return final
    tmp = Path(tmp)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}, checkpoint_id=tmp / DCP_DIR)

    def finish() -> None:
        try:
            write_model_metadata(tmp, model.config, torch.float32, tokenizer, None, meta)
            write_trainer_state(tmp, trainer_state)
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_latest(run_dir, final, keep)

    world.run_on_main(finish)
    return final


def load_sharded_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill this rank's model and optimizer from a sharded checkpoint, resharded to the current layout
    (collective when distributed; in one process, every full tensor is reassembled here)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}
    with warnings.catch_warnings():  # in one process DCP warns that it loads in one process: that is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=checkpoint / DCP_DIR, no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIMIZER_KEY])


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              saved: dict[str, Any]) -> None:
    """Load a one-process optimizer state_dict (parameters numbered in the optimizer's order) into an optimizer
    over sharded parameters: numbers become parameter names, and each rank keeps its share."""
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    by_name = {"state": {order[index]: value for index, value in saved["state"].items()},
               "param_groups": []}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        by_name["param_groups"].append({**saved_group, "params": [names[id(p)] for p in group["params"]]})
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


__all__ = ["save_sharded_checkpoint", "load_sharded_checkpoint", "load_full_optimizer_state"]
