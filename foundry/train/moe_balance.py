"""Training mixture-of-experts models: load-balancing losses, DeepSeek-V3's bias update and the experts' loads.

Two ways to keep the routers from sending most tokens to a few experts, chosen by the model's router:
- an auxiliary loss added to the objective's (Switch Transformer's, as Mixtral and Qwen-MoE train), optionally
  with ST-MoE's router z-loss, which keeps the router logits small;
- DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2412.19437, section 2.1.2): after each optimizer step every
  routing correction bias moves by gamma towards balance, b_e += gamma * sign(mean load - load_e). The bias only
  steers which experts are chosen, so no gradient is involved.

The loop records each training forward's routing (SparseMoE.record_routing), asks `MoETraining` for the losses to
add, and after the step hands it the step's loads (every micro-batch, summed over all ranks) for the bias update
and the metrics (`load_figures`). Each training record of metrics.jsonl then also holds `aux_loss` (unweighted, the
step's mean over micro-batches and ranks; k at perfect balance), `z_loss`, and per MoE layer `expert_imbalance` and
`expert_share`; train.metrics.plot_expert_load draws them as expert_load.png beside loss.png.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from foundry.model.moe import Routing, SparseMoE, moe_blocks


def router_probabilities(logits: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
    """Each token's probability over the experts [N, E]: softmax of the logits, or (DeepSeek's sigmoid routers)
    the sigmoid affinities normalised to sum to one, as DeepSeek-V3's balance loss (eq. 19) takes them."""
    if sigmoid:
        scores = logits.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)
    return logits.softmax(dim=-1)


def load_balancing_loss(routings: list[Routing], num_experts: int, sigmoid: bool = False) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2022, eq. 4-6), as Mixtral trains with it: over every
    MoE layer's tokens together, E * sum_e f_e * P_e, with f_e the (token, choice) assignments to expert e per
    token and P_e the mean router probability of e. transformers' load_balancing_loss_func exactly: f sums to k,
    so perfect balance scores k (and one expert taking everything k * E)."""
    assignments = torch.zeros(num_experts, dtype=torch.float32, device=routings[0].logits.device)
    probabilities = torch.zeros_like(assignments)
    rows = 0
    for routing in routings:
        assignments = assignments + routing.load(num_experts).float()
        probabilities = probabilities + router_probabilities(routing.logits, sigmoid).sum(dim=0)
        rows += routing.logits.shape[0]
    return num_experts * torch.sum((assignments / rows) * (probabilities / rows))


def router_z_loss(routings: list[Routing]) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over every MoE layer's tokens together of
    logsumexp(router logits)^2. With the same tokens in each layer that is the mean of the layers' z-losses (not
    their sum), so its weight does not grow with depth, as transformers' Switch Transformers computes it."""
    total = sum(torch.logsumexp(r.logits, dim=-1).square().sum() for r in routings)
    return total / sum(r.logits.shape[0] for r in routings)


@torch.no_grad()
def update_correction_bias(blocks: list[SparseMoE], loads: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: each router's correction bias moves by `rate` towards
    balance, b_e += rate * sign(mean load - load_e), from a step's loads [layers, E]. Routers without one stay."""
    for block, load in zip(blocks, loads):
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is None:
            continue
        load = load.to(device=bias.device, dtype=torch.float64)
        bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=rate)


def load_figures(loads: torch.Tensor) -> dict[str, list]:
    """A step's expert loads [layers, E] as the metrics log keeps them: per layer `expert_imbalance`, the busiest
    expert's assignments over the mean (1.0: perfect balance, E: one expert takes all), and `expert_share`, each
    expert's fraction of the layer's assignments."""
    loads = loads.detach().to("cpu", torch.float64)
    totals = loads.sum(dim=-1).clamp(min=1)
    imbalance = loads.max(dim=-1).values * loads.shape[-1] / totals
    share = loads / totals[:, None]
    return {"expert_imbalance": [round(x, 4) for x in imbalance.tolist()],
            "expert_share": [[round(x, 4) for x in row] for row in share.tolist()]}


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    """Summed over every rank when torch.distributed is initialised (so each replica updates its biases alike)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # on the model's device: NCCL's on CUDA, gloo's on CPU
    return values


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MoETraining:
    """What the loop adds to a run whose model has mixture-of-experts layers (none for a dense model).

    aux_coef: weight of the load-balancing loss; z_coef: of the router z-loss; bias_rate: DeepSeek's gamma.
    Both losses are computed per micro-batch (logged even at weight 0); only weighted ones reach the gradient."""

    def __init__(self, blocks: list[SparseMoE], aux_coef: float, z_coef: float = 0.0, bias_rate: float = 0.0):
        self.blocks = blocks
        self.num_experts = blocks[0].num_experts
        self.sigmoid = bool(blocks[0].gate.sigmoid)
        self.aux_coef, self.z_coef, self.bias_rate = aux_coef, z_coef, bias_rate
        self._index = {id(block): i for i, block in enumerate(blocks)}
        self._recording = False
        self._routings: list[tuple[int, Routing]] = []
        self._hooks = [block.register_forward_hook(self._keep) for block in blocks]
        self._step_loads: torch.Tensor | None = None
        self._step_losses: list[torch.Tensor] = []  # [aux, z] of each micro-batch

    @classmethod
    def of(cls, model: nn.Module, aux_coef: float | None, z_coef: float, bias_rate: float) -> MoETraining | None:
        """The MoE training of `model` (None when it has no MoE layer); aux_coef None: the model config's."""
        blocks = moe_blocks(model)
        if not blocks:
            return None
        if aux_coef is None:
            aux_coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0)
        return cls(blocks, aux_coef, z_coef, bias_rate)

    @property
    def corrects_bias(self) -> bool:
        """Whether the step's loads move any router's correction bias."""
        return self.bias_rate > 0 and any(hasattr(b.gate, "e_score_correction_bias") for b in self.blocks)

    def _keep(self, block: nn.Module, inputs: Any, output: Any) -> None:
        # Each forward with gradients inside `recording` (a DPO step runs several; a reference pass has none, and
        # activation checkpointing's recomputation runs after recording has ended).
        if not self._recording:
            return
        if block.routing is not None and torch.is_grad_enabled():
            self._routings.append((self._index[id(block)], block.routing))
        block.routing = None  # the module keeps no graph alive between steps

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the routing of the forward passes run inside (the objective's call on one micro-batch)."""
        for block in self.blocks:
            block.record_routing = True
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
            for block in self.blocks:
                block.record_routing, block.routing = False, None

    def extra_loss(self) -> torch.Tensor | None:
        """The weighted balancing losses of the micro-batch just recorded, to add to its loss (None: nothing to
        add); counts its loads towards the step's."""
        routings, self._routings = self._routings, []
        if not routings:
            return None
        device = routings[0][1].logits.device
        loads = torch.zeros(len(self.blocks), self.num_experts, dtype=torch.float64, device=device)
        for index, routing in routings:
            loads[index] += routing.load(self.num_experts)
        self._step_loads = loads if self._step_loads is None else self._step_loads + loads
        kept = [routing for _, routing in routings]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.aux_coef > 0):
            aux = load_balancing_loss(kept, self.num_experts, self.sigmoid)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.z_coef > 0):
            z = router_z_loss(kept)
        self._step_losses.append(torch.stack([aux.detach(), z.detach()]).double())
        terms = [coef * loss for coef, loss in ((self.aux_coef, aux), (self.z_coef, z)) if coef > 0]
        return sum(terms[1:], terms[0]) if terms else None

    def end_step(self, updated: bool) -> dict[str, Any]:
        """After the optimizer step: the step's loads and losses over every rank (one all-reduce), the bias update
        when the weights were updated, and the step's figures for the metrics log (empty when nothing ran)."""
        loads, losses = self._step_loads, self._step_losses
        self._step_loads, self._step_losses = None, []
        if loads is None:
            return {}
        packed = _all_reduce(torch.cat([loads.flatten(), torch.stack(losses).sum(dim=0)]))
        loads = packed[:loads.numel()].view_as(loads)
        aux, z = (packed[loads.numel():] / (len(losses) * _world_size())).tolist()
        if updated and self.corrects_bias:
            update_correction_bias(self.blocks, loads, self.bias_rate)
        return {"aux_loss": aux, "z_loss": z, **load_figures(loads)}

    def close(self) -> None:
        """Remove the hooks: the model is as it was before training."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


__all__ = ["MoETraining", "load_balancing_loss", "load_figures", "router_probabilities", "router_z_loss",
           "update_correction_bias"]
