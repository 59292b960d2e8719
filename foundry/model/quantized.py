"""Frozen quantised linears (int8 absmax per output channel, 4-bit NormalFloat) for QLoRA-style fine-tuning.

The weights are buffers, never parameters: nothing can train them, and the optimizer never sees them. Each
forward dequantises the whole weight to the input's dtype, which trades compute for memory; that is the point
when the base only has to be held, not updated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

# The 16 levels of NF4: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, Dettmers et al. 2023,
# appendix E; the values bitsandbytes uses).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NF4_BLOCK = 64
QUANTIZATIONS = ("int8", "nf4")


class QuantizedLinear(nn.Module):
    """What the int8 and nf4 linears share: shapes, the kept bias, and forward through a dequantised weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype  # the dtype forward dequantises to when the input has none of its own
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in float32, as closely as the quantisation keeps it."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantised weight (in the original dtype)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.dequantize().device, dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """A frozen linear stored as int8 with one float32 absmax scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]


class NF4Linear(QuantizedLinear):
    """A frozen linear stored as 4-bit NormalFloat codes (two per byte), one float32 absmax per block of 64.

    The absmax values are not quantised a second time (QLoRA's double quantisation would save 0.37 bits/param)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        flat = linear.weight.detach().float().reshape(-1)
        padded = -flat.numel() % NF4_BLOCK  # a last partial block is padded with zeros and cut off on the way out
        blocks = F.pad(flat, (0, padded)).view(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        levels = torch.tensor(NF4_LEVELS, device=flat.device)
        midpoints = (levels[1:] + levels[:-1]) / 2
        codes = torch.bucketize((blocks / absmax[:, None]).reshape(-1), midpoints).to(torch.uint8)
        self.register_buffer("codes", codes[0::2] << 4 | codes[1::2])  # NF4_BLOCK is even: pairs never straddle
        self.register_buffer("absmax", absmax)
        self.register_buffer("levels", levels, persistent=False)

    def dequantize(self) -> torch.Tensor:
        codes = torch.stack([self.codes >> 4, self.codes & 0x0F], dim=1).reshape(-1).long()
        values = (self.levels[codes].view(-1, NF4_BLOCK) * self.absmax[:, None]).reshape(-1)
        return values[:self.in_features * self.out_features].view(self.out_features, self.in_features)


_KINDS = {"int8": Int8Linear, "nf4": NF4Linear}


def quantize_frozen(model: nn.Module, kind: str = "int8", skip: Iterable[str] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear (but those whose name or last name part is in `skip`) by a frozen quantised one.

    Returns the names replaced. Apply LoRA afterwards for QLoRA: `apply_lora` wraps quantised linears too."""
    if kind not in _KINDS:
        raise ValueError(f"unknown quantization {kind!r}; known: {', '.join(QUANTIZATIONS)}")
    skip = set(skip)
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name in skip or name.rpartition(".")[2] in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _KINDS[kind](module))
        replaced.append(name)
    return replaced


def memory_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, a tensor shared by two names counted once."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
