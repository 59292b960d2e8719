"""The mixture-of-experts MLP: a router picks k of the routed experts per token, plus any always-on shared expert.

One block covers the families (ModelConfig's switches): softmax top-k with optional renormalisation (Mixtral,
Qwen-MoE, DeepSeek-V2), DeepSeek-V3's sigmoid scores with a score-correction bias that only steers the choice, group-limited
top-k and a routed scaling factor, and Qwen2-MoE's sigmoid-gated shared expert or DeepSeek's plain shared experts.
Experts run as one matmul each over the tokens routed to them (tokens sorted by expert), never a loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from foundry.config import ModelConfig
from foundry.model.layers import MLP


@dataclass
class Routing:
    """One MoE layer's routing of the last forward pass: what training losses and load metrics read."""

    logits: torch.Tensor  # [N, E] fp32 router logits (in the graph while training)
    experts: torch.Tensor  # [N, k] chosen expert ids

    def load(self, num_experts: int) -> torch.Tensor:
        """Tokens routed to each expert [E] (each token counted once per chosen expert)."""
        return torch.bincount(self.experts.reshape(-1), minlength=num_experts)


class Router(nn.Module):
    """Scores every expert for each token and keeps the top k: (weights [N, k] fp32, expert ids [N, k])."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=config.initializer_range)
        if config.router_correction_bias:  # a buffer: balanced by training's bias update, not by gradients
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        self.top_k = config.num_experts_per_tok
        self.sigmoid = config.router_scoring == "sigmoid"
        self.normalise = config.norm_topk_prob
        self.groups, self.topk_groups = config.router_groups, config.router_topk_groups
        self.group_by_best = config.router_group_scoring == "max"
        self.fp32 = config.router_fp32
        self.scaling = config.routed_scaling_factor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E] in fp32 (DeepSeek computes them in fp32; the others in the weights' dtype)."""
        if self.fp32:
            return F.linear(x.float(), self.weight.float())
        return F.linear(x, self.weight).float()

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        choice = scores
        if hasattr(self, "e_score_correction_bias"):
            choice = scores + self.e_score_correction_bias
        if self.groups > 1:  # keep the topk_groups groups that score highest (two best experts' sum, or best)
            grouped = choice.view(-1, self.groups, choice.shape[-1] // self.groups)
            rank = grouped.amax(dim=-1) if self.group_by_best else grouped.topk(2, dim=-1).values.sum(dim=-1)
            best = rank.topk(self.topk_groups, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if self.sigmoid else 0.0))
        return weights * self.scaling, experts


class SparseMoE(nn.Module):
    """Routed experts (Hugging Face names: `gate`, `experts.N.{gate,up,down}_proj`) and any shared expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate = Router(config)
        self.experts = nn.ModuleList(MLP(config, config.expert_size) for _ in range(config.num_experts))
        if config.shared_expert_intermediate_size:
            self.shared_experts = MLP(config, config.shared_expert_intermediate_size)
        if config.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.record_routing = False  # keep `routing` after each forward (training sets it)
        self.routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate.logits(x)
        weights, experts = self.gate(logits)
        if self.record_routing:
            self.routing = Routing(logits, experts)
        out = self.routed(x, weights, experts)
        if hasattr(self, "shared_experts"):
            shared = self.shared_experts(x)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.view(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of weight * expert(token): tokens sorted by expert, one matmul
        per expert that has any, scattered back with one index_add."""
        k = experts.shape[1]
        order = experts.reshape(-1).argsort(stable=True)
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts).tolist()
        token = order // k
        # Under autograd every expert runs, an empty one on zero rows: each parameter then gets a gradient (zeros),
        # which data-parallel reducers wait for from every rank.
        every = torch.is_grad_enabled()
        outputs = [self.experts[e](chunk) for e, chunk in enumerate(x[token].split(counts)) if counts[e] or every]
        scaled = (torch.cat(outputs).float() * weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, scaled)


def moe_blocks(model: nn.Module) -> list[SparseMoE]:
    """The mixture-of-experts blocks of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


__all__ = ["Router", "Routing", "SparseMoE", "moe_blocks"]
