"""Planning before spending: training FLOPs, time, cost and memory, scaling laws, the hardware catalog.

Pure arithmetic over `ModelConfig`; never imports torch, so `foundry plan` runs where torch is not
installed. May import only `foundry.config` and `foundry.core`.
"""

from foundry.plan.planner import (
    PlanRequest,
    activation_bytes,
    layer_activation_bytes,
    make_plan,
    model_state_bytes,
    parse_count,
)

__all__ = [
    "PlanRequest",
    "activation_bytes",
    "layer_activation_bytes",
    "make_plan",
    "model_state_bytes",
    "parse_count",
]
