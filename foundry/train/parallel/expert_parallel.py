"""Expert parallelism: each mixture-of-experts layer's routed experts split over `ep` data-parallel ranks, every
(token, choice) row sent to the rank that holds its expert and back by all-to-all.

Layout (the usual one): the dp ranks form groups of ep neighbours; rank i of a group keeps experts
[i * E/ep, (i + 1) * E/ep) of every MoE layer, under their global names (`experts.5.up_proj.weight`), and every
other parameter whole, as plain data parallelism does. The ranks at the same place of each group (dp/ep of them)
hold the same experts: they are one another's replicas.

Forward, per MoE block: route locally; sort the rows by expert; exchange per-expert counts; all-to-all the rows to
the experts' ranks; one matmul per local expert over the rows of every rank of the group; all-to-all the outputs
back; weight and index_add them as one process does. The all-to-all is differentiable: its backward sends each
row's gradient to the rank that owns the expert, which is how expert gradients gather every rank's tokens.

Gradients: DDP averages the non-expert parameters over all dp ranks and leaves the experts alone. An expert's
gradient on its owner already sums the contributions of every rank of its group (dp processes each back-propagate
their own mean loss; one process's gradient is the mean over them), so after a synchronising backward pass the
experts' gradients are summed over the replicas and divided by dp: then every gradient equals one process's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed._functional_collectives import all_to_all_single_autograd

from foundry.config import ModelConfig
from foundry.model.moe import SparseMoE, moe_blocks
from foundry.train.parallel.world import World

EXPERT_GROUP = "expert_group"  # the attribute that marks an expert parameter: its ep process group


def expert_parallel_refusal(config: ModelConfig, ep: int) -> str | None:
    """Why this model cannot split its experts `ep` ways, in one sentence; None when it can."""
    if ep < 1:
        return f"--ep must be a positive integer, got {ep}"
    if ep == 1:
        return None
    if not config.num_experts:
        return f"--ep {ep}: {config.architecture} is a dense model (no mixture-of-experts layers); drop --ep"
    if config.num_experts % ep:
        return (f"--ep {ep} must divide the model's {config.num_experts} experts per layer; pick an --ep that "
                f"divides {config.num_experts}")
    return None


@dataclass(frozen=True)
class ExpertLayout:
    """Where this rank sits among the expert-parallel groups."""

    ep: int  # ranks each MoE layer's experts are split over
    dp: int  # data-parallel ranks in all
    index: int  # this rank's place in its group: it holds the index-th block of experts
    group: dist.ProcessGroup  # this rank's group of ep ranks (one copy of all experts)
    replicas: dist.ProcessGroup | None  # the dp/ep ranks holding the same experts (None when dp == ep)
    first_group: bool  # whether this rank's group is rank 0's (the one checkpoints gather from)

    def experts_of(self, num_experts: int) -> range:
        """The global ids of the experts this rank holds."""
        per_rank = num_experts // self.ep
        return range(self.index * per_rank, (self.index + 1) * per_rank)


def expert_layout(world: World) -> ExpertLayout:
    """The ep groups and replica groups of this run (collective: every rank creates every group)."""
    ep, dp = world.ep, world.dp
    group, _ = dist.new_subgroups_by_enumeration([list(range(b * ep, (b + 1) * ep)) for b in range(dp // ep)])
    replicas = None
    if dp > ep:
        replicas, _ = dist.new_subgroups_by_enumeration([list(range(i, dp, ep)) for i in range(ep)])
    return ExpertLayout(ep, dp, world.rank % ep, group, replicas, world.rank < ep)


class ExpertGradients:
    """Finishes the experts' gradients at the end of each synchronising backward pass: summed over the replicas,
    divided by dp (see the module docstring). `should_sync` says whether this pass synchronises (DDP's no_sync
    turns it off for the micro-batches before a step's last)."""

    def __init__(self, params: list[nn.Parameter], layout: ExpertLayout):
        self.params, self.layout = params, layout
        self.should_sync: Callable[[], bool] = lambda: True
        self._queued = False

    def watch(self, output: torch.Tensor) -> None:
        """Have the backward pass through `output` (an MoE block's routed sum) finish the gradients at its end."""
        if output.requires_grad:
            output.register_hook(self._queue)

    def _queue(self, grad: torch.Tensor) -> None:
        if not self._queued:  # once per backward pass, whatever the number of MoE layers
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _finish(self) -> None:
        self._queued = False
        if self.should_sync():
            finish_expert_gradients(self.params, self.layout)


@torch.no_grad()
def finish_expert_gradients(params: list[nn.Parameter], layout: ExpertLayout) -> None:
    """Sum the experts' gradients over the replicas, then divide by dp. An expert that no token reached gets a
    zero gradient, as in one process, where every expert runs under autograd (SparseMoE.routed)."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [p.grad for p in params]
    if layout.replicas is not None:
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=layout.replicas)
        for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(summed)
    torch._foreach_div_(grads, float(layout.dp))


class ExpertDispatch:
    """An MoE block's `routed` under expert parallelism: the same sum as SparseMoE.routed, with the experts'
    matmuls run on the ranks that hold them."""

    def __init__(self, block: SparseMoE, layout: ExpertLayout, gradients: ExpertGradients):
        self.block, self.layout, self.gradients = block, layout, gradients
        self.first = layout.experts_of(block.num_experts).start

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        ep, group, k = self.layout.ep, self.layout.group, experts.shape[1]
        local = self.block.num_experts // ep
        order = experts.reshape(-1).argsort(stable=True)
        token = order // k
        counts = torch.bincount(experts.reshape(-1), minlength=self.block.num_experts)
        # received[s, e]: rows source rank s sends to this rank's e-th expert.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)
        received = received.view(ep, local)
        sent = counts.view(ep, local).sum(dim=1).tolist()
        came = received.sum(dim=1).tolist()
        # Rows travel in autocast's dtype when it is on (half the traffic): the experts' matmuls would cast them
        # to it anyway and their outputs come out in it, so the forward is one process's exactly; backward, a
        # row's gradient is rounded to it once more (one process sums the gate and up projections' in fp32).
        # Every rank uses the same dtype, also one with no rows (no expert output to take it from).
        wire = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = _exchange(x[token].to(wire), came, sent, group)  # grouped by source rank, then by expert
        # Regroup by expert, each expert's rows in source-rank order (one process's order of the global batch).
        segment = torch.repeat_interleave(torch.arange(ep * local, device=x.device), received.reshape(-1))
        by_expert = ((segment % local) * ep + segment // local).argsort(stable=True)
        sizes = received.sum(dim=0).tolist()
        every = torch.is_grad_enabled()  # as SparseMoE.routed: under autograd an idle expert runs on zero rows
        outputs = [self.block.experts[str(self.first + e)](chunk)
                   for e, chunk in enumerate(rows[by_expert].split(sizes)) if sizes[e] or every]
        done = torch.cat(outputs).to(wire) if outputs else rows[:0]
        returned = _exchange(done[by_expert.argsort()], sent, came, group)
        scaled = (returned.float() * weights.reshape(-1)[order, None]).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, scaled)
        self.gradients.watch(out)
        return out


def _exchange(rows: torch.Tensor, incoming: list[int], outgoing: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all of rows (differentiable): outgoing[r] rows to rank r of the group, incoming[r] from it."""
    return all_to_all_single_autograd(rows.contiguous(), incoming, outgoing, group)


def apply_expert_parallel(model: nn.Module, world: World) -> ExpertGradients | None:
    """Keep only this rank's experts in each MoE block of `model` (a Transformer whose every rank holds the same
    full weights, on the CPU or the device), move it to the device, and dispatch tokens to the other ranks'
    experts; in place. Returns what finishes the experts'
    gradients (its should_sync is the data-parallel wrapper's to set), None when world.ep is 1."""
    if world.ep == 1:
        return None
    layout = expert_layout(world)
    params: list[nn.Parameter] = []
    blocks = moe_blocks(model)
    gradients = ExpertGradients(params, layout)
    for block in blocks:
        held = layout.experts_of(block.num_experts)
        block.experts = nn.ModuleDict({str(e): block.experts[e] for e in held})
        block.expert_layout = layout
        block.register_state_dict_pre_hook(_refuse_partial_state)
        for param in block.experts.parameters():
            setattr(param, EXPERT_GROUP, layout.group)
            params.append(param)
        block.routed = ExpertDispatch(block, layout, gradients)
    model.to(world.device)  # the model may have been built on the CPU: only this rank's share goes to the device
    return gradients


def _refuse_partial_state(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    # A state dict of one rank's experts is no model: checkpoints gather them first (expert_checkpoint.py).
    if len(module.experts) != module.num_experts:
        raise RuntimeError(f"{prefix or 'an MoE block'} holds {len(module.experts)} of its {module.num_experts} "
                           "experts (expert parallel): gather them with expert_checkpoint.gathered_experts first")


def is_expert_parallel(model: nn.Module) -> bool:
    """Whether apply_expert_parallel has split this model's experts."""
    return any(hasattr(block, "expert_layout") for block in moe_blocks(model))


def is_expert_param(param: torch.Tensor) -> bool:
    """Whether a parameter is one of this rank's share of the experts (its gradient is not replicated)."""
    return hasattr(param, EXPERT_GROUP)


__all__ = ["EXPERT_GROUP", "ExpertDispatch", "ExpertGradients", "ExpertLayout", "apply_expert_parallel",
           "expert_layout", "expert_parallel_refusal", "finish_expert_gradients", "is_expert_parallel",
           "is_expert_param"]
