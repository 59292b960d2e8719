"""The planner's arithmetic for mixtures of experts and latent attention: what expert parallelism splits, the
widths a layer keeps for backward, and what the KV cache holds. Pure arithmetic over `ModelConfig` (no torch).
"""

from __future__ import annotations

from foundry.config import ModelConfig
from foundry.core.errors import UserError


def routed_expert_params(config: ModelConfig | None) -> int:
    """Parameters of the routed experts in all layers: what expert parallelism splits. Routers, shared experts,
    attention, dense layers and embeddings are the rest, laid out as a dense model's."""
    if config is None or not config.num_experts:
        return 0
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return moe_layers * config.num_experts * config.dense_mlp_params(config.expert_size)


def check_expert_parallel(config: ModelConfig | None, ep: int, gpus: int, dp: int) -> None:
    """UserError unless `ep` can split this model's experts over this layout's data-parallel ranks."""
    if ep == 1:
        return
    if config is None:
        raise UserError(f"--ep {ep} needs a model (preset, config file or model directory), not --params: "
                        "expert parallelism splits the model's experts")
    if not config.num_experts:
        raise UserError(f"--ep {ep}: the model has no experts (a dense model); expert parallelism needs a "
                        "mixture-of-experts model, drop --ep")
    if config.num_experts % ep:
        raise UserError(f"--ep {ep} does not divide the model's {config.num_experts} experts per layer")
    if ep > gpus:
        raise UserError(f"--ep {ep} is more than the {gpus} devices; give --gpus at least {ep}")
    if dp % ep:
        raise UserError(f"--ep {ep} must divide the data-parallel degree dp = {dp}: the experts are split over "
                        "data-parallel ranks (dp = gpus / (tp x pp))")


def attention_widths(config: ModelConfig) -> tuple[float, float]:
    """(q_width, kv_width) for the activation formula, which keeps Q and the output at the first, K and V at the
    second. Latent attention keeps per-head K and V expanded from its latent: every one of the four averages
    heads x (qk_head_dim + v_head_dim) / 2 channels."""
    if config.kv_lora_rank:
        width = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) / 2
        return width, width
    return config.q_size, config.kv_size


def mean_mlp_width(config: ModelConfig) -> float:
    """A token's MLP width averaged over the layers: the dense width, or k routed experts plus the shared one.
    (The activation formula is linear in it, so the mean over layers gives the sum over layers.)"""
    widths = [config.num_experts_per_tok * config.expert_size + config.shared_expert_intermediate_size
              if config.is_moe_layer(i) else config.intermediate_size for i in range(config.num_hidden_layers)]
    return sum(widths) / len(widths)


def mean_routed_copies(config: ModelConfig) -> float:
    """Routed copies of each token per layer, averaged over the layers (k in a mixture-of-experts layer, else 0)."""
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return config.num_experts_per_tok * moe_layers / config.num_hidden_layers


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: float) -> float:
    """KV-cache bytes one token takes, all layers: K and V per KV head, or latent attention's latent + rope key."""
    return config.kv_cache_values_per_token() * bytes_per_value


def moe_note(config: ModelConfig) -> str:
    """One line saying how the plan counts a mixture of experts."""
    total, active = config.num_params(), config.num_params(active_only=True)
    share = routed_expert_params(config) / total
    shared = " + the shared expert" if config.shared_expert_intermediate_size else ""
    return (f"mixture of experts: FLOPs count the {active / 1e9:.2f}B active parameters ({config.num_experts_per_tok} "
            f"of {config.num_experts} routed experts per token{shared}), memory all {total / 1e9:.2f}B; the routed "
            f"experts are {share:.1%} of the parameters")


def expert_parallel_note(layout: dict) -> str:
    """One line saying how expert parallelism lays out the experts' states."""
    ep, dp = layout["ep"], layout["dp"]
    return (f"expert parallelism: the routed experts' weights, gradients and Adam states are split over ep {ep} "
            f"(and tp x pp), ZeRO shards them over the dp / ep = {dp // ep} ranks that hold the same experts; the "
            "rest as a dense model's; all-to-all dispatch time is inside the MFU")


__all__ = [
    "attention_widths",
    "check_expert_parallel",
    "expert_parallel_note",
    "kv_cache_bytes_per_token",
    "mean_mlp_width",
    "mean_routed_copies",
    "moe_note",
    "routed_expert_params",
]
