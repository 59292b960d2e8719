"""Checkpoints of expert-parallel runs: the whole model and the whole optimizer state, as one process writes them.

Each rank holds only its share of the experts, so before rank 0 writes a checkpoint the first ep group's ranks send
it their experts' weights (gathered_experts) and optimizer state (full_optimizer_state); the checkpoint is then an
ordinary model directory (transformers and `foundry generate` load it as it is) whose trainer state numbers the
parameters as a one-process run does. Resuming, every rank loads the full weights and keeps its own experts, and
load_optimizer_state hands each rank its share of the saved state: a checkpoint resumes at any --ep or in one
process, and an expert-parallel run resumes any one-process or DDP checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from foundry.core.errors import UserError
from foundry.model.layers import MLP
from foundry.model.moe import SparseMoE
from foundry.train.parallel.expert_parallel import ExpertLayout, is_expert_param


def _split_blocks(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE) and hasattr(m, "expert_layout")]


def _gather_on_main(value: Any, layout: ExpertLayout) -> list[Any] | None:
    """Every value of rank 0's ep group, on rank 0 (collective within that group); None on every other rank."""
    if not layout.first_group:
        return None
    values = [None] * layout.ep if layout.index == 0 else None
    dist.gather_object(value, values, dst=0, group=layout.group)
    return values


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    return value


def full_parameter_names(model: nn.Module) -> list[tuple[str, str]]:
    """(name, stand-in) for every parameter of the whole model, in the whole model's order: the stand-in is the
    name itself, or for an expert this rank does not hold, the same tensor of the block's first expert here."""
    blocks = dict(_split_blocks(model))
    names: list[tuple[str, str]] = []
    done: set[str] = set()
    for name, param in model.named_parameters():
        if not is_expert_param(param):
            names.append((name, name))
            continue
        prefix = name.split(".experts.")[0]
        if prefix in done:
            continue
        done.add(prefix)
        block = blocks[prefix]
        first = next(iter(block.experts.keys()))
        tensors = [sub for sub, _ in block.experts[first].named_parameters()]
        names += [(f"{prefix}.experts.{e}.{sub}", f"{prefix}.experts.{first}.{sub}")
                  for e in range(block.num_experts) for sub in tensors]
    return names


@contextmanager
def gathered_experts(model: nn.Module) -> Iterator[None]:
    """Within this block, rank 0's model holds every expert (the others' as CPU copies), so that its state dict is
    the whole model's; every rank must enter it (the first ep group sends its experts). No-op without experts split."""
    blocks = _split_blocks(model)
    if not blocks:
        yield
        return
    layout = blocks[0][1].expert_layout
    mine = {name: p.detach().cpu() for name, p in model.named_parameters() if is_expert_param(p)}
    gathered = _gather_on_main(mine if layout.first_group else None, layout)
    if gathered is None or layout.index != 0:
        yield
        return
    values = {name: tensor for part in gathered for name, tensor in part.items()}
    held = [block.experts for _, block in blocks]
    for prefix, block in blocks:
        block.experts = _every_expert(block, prefix, values, model.config)
    try:
        yield
    finally:
        for (_, block), experts in zip(blocks, held):
            block.experts = experts


def _every_expert(block: SparseMoE, prefix: str, values: dict[str, torch.Tensor], config: Any) -> nn.ModuleList:
    experts = nn.ModuleList()
    for e in range(block.num_experts):
        if str(e) in block.experts:
            experts.append(block.experts[str(e)])
            continue
        with torch.device("meta"):
            expert = MLP(config, config.expert_size)
        start = f"{prefix}.experts.{e}."
        expert.load_state_dict({name.removeprefix(start): value for name, value in values.items()
                                if name.startswith(start)}, assign=True)
        experts.append(expert)
    return experts


def _names_in_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _group_members(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Each optimizer group's parameters in the whole model (one process's optimizer lists them in model order);
    an expert held elsewhere is in the group of its stand-in here."""
    names = {id(param): name for name, param in model.named_parameters()}
    group_of = {names[id(p)]: g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    members: list[list[str]] = [[] for _ in optimizer.param_groups]
    for name, stand_in in full_parameter_names(model):
        if stand_in in group_of:
            members[group_of[stand_in]].append(name)
    return members


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer's state_dict as one process over the whole model would give it, on rank 0 (None on the other
    ranks); every rank must call it. Without experts split: the optimizer's own state_dict."""
    state = optimizer.state_dict()
    blocks = _split_blocks(model)
    if not blocks:
        return state
    layout = blocks[0][1].expert_layout
    order = _names_in_order(model, optimizer)
    by_name = {order[index]: value for index, value in state["state"].items()}
    held = {name for name, param in model.named_parameters() if is_expert_param(param)}
    mine = {name: _on_cpu(value) for name, value in by_name.items() if name in held}
    gathered = _gather_on_main(mine if layout.first_group else None, layout)
    if gathered is None or layout.index != 0:
        return None
    for part in gathered:
        by_name.update(part)
    whole: dict[int, Any] = {}
    groups, offset = [], 0
    for group, names in zip(state["param_groups"], _group_members(model, optimizer)):
        ids = list(range(offset, offset + len(names)))
        whole.update({index: by_name[name] for index, name in zip(ids, names) if name in by_name})
        groups.append({**group, "params": ids})
        offset += len(names)
    return {"state": whole, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a whole-model optimizer state_dict (one process's, or full_optimizer_state's): with experts split,
    each rank keeps the state of the parameters it holds; else the optimizer's own load_state_dict."""
    if not _split_blocks(model):
        optimizer.load_state_dict(saved)
        return
    members = _group_members(model, optimizer)
    sizes, wanted = [len(g["params"]) for g in saved["param_groups"]], [len(names) for names in members]
    if sizes != wanted:
        raise UserError(f"the checkpoint's optimizer state has parameter groups of {sizes} tensors, this model's "
                        f"optimizer {wanted}; resume with the model and settings that wrote it")
    name_of = {index: name for group, names in zip(saved["param_groups"], members)
               for index, name in zip(group["params"], names)}
    local = {name: index for index, name in enumerate(_names_in_order(model, optimizer))}
    state = {local[name_of[index]]: value for index, value in saved["state"].items() if name_of[index] in local}
    groups, offset = [], 0
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
        groups.append({**saved_group, "params": list(range(offset, offset + len(group["params"])))})
        offset += len(group["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


__all__ = ["full_optimizer_state", "full_parameter_names", "gathered_experts", "load_optimizer_state"]
