"""CPU decoding speed: linear layers whose fp32 (or native bf16) weights are prepacked once for oneDNN's kernels."""

from __future__ import annotations

import torch
from torch import nn

# Measured here (AMD Zen 5, 2 threads, fp32): oneDNN with a prepacked weight beats the default MKL
# path 1.4-4x for one-token steps once a weight is >= ~1.5 MB (384x8192: 1.1 ms -> 0.25 ms), and
# 1.3-3x at 16 tokens; smaller weights stay in cache, where MKL is as fast or faster (384x384:
# 30 us vs 52 us). See benchmarks/decode.py for the effect on whole decode steps.
MIN_PACKED_ELEMENTS = 256 * 1024


class PackedLinear(nn.Module):
    """An inference-only stand-in for nn.Linear with the weight reordered for oneDNN (fp32 or bf16, CPU)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        # A plain attribute, not a parameter: the blocked layout is opaque and never trained or saved.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_prepack(model: nn.Module, device: torch.device) -> bool:
    """Whether prepacking applies: an fp32 model (or bf16 where the CPU computes bf16 natively) on a CPU
    whose torch has oneDNN."""
    dtype = next(model.parameters()).dtype
    # oneDNN's own check of bf16 hardware (the engine never reaches here with emulated bf16: see infer/device.py)
    packable = dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device.type == "cpu" and packable and torch.backends.mkldnn.is_available()


@torch.no_grad()
def prepack_linears(model: nn.Module, min_elements: int = MIN_PACKED_ELEMENTS) -> int:
    """Replace the model's large nn.Linear layers by PackedLinear, in place; returns how many.

    The model is inference-only afterwards (no gradients or state_dict for those layers), so only
    apply this to a model the caller owns, e.g. one loaded just for serving. A weight shared with
    another module (a head tied to the embedding) stays as it is: packing would copy it, and the
    embedding lookup needs the plain layout, so the table would sit in memory twice."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (type(child) is nn.Linear and child.weight.numel() >= min_elements
                    and uses[id(child.weight)] == 1):
                setattr(module, name, PackedLinear(child))
                swapped += 1
    return swapped
