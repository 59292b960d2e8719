"""Weight-only quantised linears for inference: int8 (one scale per output channel) and int4 (one scale per group of
input channels), both symmetric, activations kept in floating point.

On CPU they run torch's own weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which read
the integer weights directly and also run under torch.compile; on other devices, or shapes those kernels refuse,
each forward dequantises and calls F.linear. Everything is a buffer: nothing here trains.

A module's state dict is compressed-tensors' `pack-quantized` layout (what llm-compressor writes for W8A16/W4A16;
transformers loads it, tests/test_quantize.py): `weight_packed` (int32, 32/bits values per word along in_features, each offset by
2^(bits-1)) and `weight_scale` ([out, 1] or [out, in/group], the model's dtype), plus `bias` when there is one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foundry.core.errors import UserError

SCHEMES = {"int8": 8, "int4": 4}
# int4's default group: 32 is llama.cpp's q4_0 block, 128 GPTQ's (which calibrates; plain rounding does not). On
# N(0, 1) weights group 32 leaves 0.79x group 128's squared error for 0.375 more bits per weight (bf16 scales);
# on a trained tiny model perplexity rose 0.84% (32), 0.73% (64), 1.23% (128) over fp32.
DEFAULT_GROUP_SIZE = 32
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
# The CPU kernels take fp32 or bf16 activations (their scales in the same dtype), but only bf16 has a fast path:
# measured at one token (AVX-512, 2 threads), 1024x384 int8 19 us in bf16 against 192 us in fp32, int4 32 us
# against 369 us (fp32 through oneDNN: 33 us). So activations meet the integer weights in bf16, as llama.cpp's
# q8_0 meets them in int8, and the result returns to the input's dtype.
KERNEL_DTYPE = torch.bfloat16
_CPU_BLOCK_ROWS = 256  # _convert_weight_to_int4pack_for_cpu packs rows in blocks of 64 (AVX512) or 32: any multiple


# ---- integer values and their packed form ---------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale [out, groups] in scale_dtype) with weight ~= q * scale, symmetric round-to-nearest.

    int8: scale = absmax / 127, q in [-127, 127]. int4: scale = absmax / 8, q in [-8, 7], so a group's largest
    positive value (if it is the absmax) is clipped by up to one step. Measured on N(0, 1) groups of 32 / 64 / 128,
    the relative squared error is 8.8e-3 / 9.9e-3 / 11.2e-3 for absmax / 8, against 9.0e-3 / 10.6e-3 / 12.3e-3
    for absmax / 7.5 (compressed-tensors' minmax) and 9.4e-3 / 11.6e-3 / 13.8e-3 for absmax / 7 (no clipping);
    the trained model of tests/test_quantize.py agrees within its noise."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = w.reshape(out_features, -1, group_size or in_features)
    qmax = (1 << (bits - 1)) - 1
    scale = groups.abs().amax(dim=-1) / (qmax if bits == 8 else qmax + 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype or weight.dtype)
    q = torch.round(groups / scale.float()[..., None]).clamp(-qmax - 1, qmax)
    return q.to(torch.int8).view(out_features, in_features), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [out, in] * scale [out, groups], each scale applying to in/groups consecutive inputs, in `dtype`."""
    out_features, in_features = q.shape
    groups = q.view(out_features, scale.shape[1], -1).to(dtype) * scale.to(dtype)[..., None]
    return groups.view(out_features, in_features)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q int8 [out, in] as compressed-tensors packs it: q + 2^(bits-1), 32/bits values per int32 word, the first
    in the lowest bits; a last partial word is padded with zeros."""
    per_word = 32 // bits
    unsigned = q.to(torch.int64) + (1 << (bits - 1))
    unsigned = F.pad(unsigned, (0, -q.shape[1] % per_word)).view(q.shape[0], -1, per_word)
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (unsigned << shifts).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement


def unpack_int32(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The int8 values [out, in_features] of pack_int32's words.

    One slot of every word at a time, straight into the int8 result: the temporaries are the size of the packed
    words, not 4-8 bytes a weight (which, layer after layer, left a loaded model's process several times its size)."""
    per_word, mask, offset = 32 // bits, (1 << bits) - 1, 1 << (bits - 1)
    out = torch.empty(packed.shape[0], packed.shape[1], per_word, dtype=torch.int8, device=packed.device)
    for slot in range(per_word):
        out[..., slot] = ((packed >> (slot * bits)) & mask) - offset
    out = out.view(packed.shape[0], -1)
    return out if out.shape[1] == in_features else out[:, :in_features].contiguous()


# ---- the modules ----------------------------------------------------------------------------------------------

class WeightOnlyLinear(nn.Module):
    """What the int8 and int4 linears share: shapes, scales, the kept bias, and the compressed-tensors state dict."""

    bits: int

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group_size: int | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size  # None: one scale per output channel
        if scale.shape != (self.out_features, self.in_features // (group_size or self.in_features)):
            raise ValueError(f"scales of shape {tuple(scale.shape)} do not fit a weight of {tuple(q.shape)} in groups "
                             f"of {group_size}")
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> WeightOnlyLinear:
        """Quantise an nn.Linear (its scales in its own dtype)."""
        q, scale = quantize_weight(linear.weight, cls.bits, group_size)
        return cls(q, scale, linear.bias, group_size)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    in_features: int, group_size: int | None) -> WeightOnlyLinear:
        """A module from compressed-tensors' tensors (weight_packed, weight_scale)."""
        return cls(unpack_int32(packed, cls.bits, in_features), scale, bias, group_size)

    @property
    def group(self) -> int:
        """Inputs per scale (in_features when there is one scale per output channel)."""
        return self.group_size or self.in_features

    def int_weight(self) -> torch.Tensor:
        """The integer weight q [out, in] (int8)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] as the integers and scales give it."""
        return dequantize_weight(self.int_weight(), self.weight_scale, dtype)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight_packed"] = pack_int32(self.int_weight(), self.bits)
        destination[prefix + "weight_scale"] = self.weight_scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class Int8WeightLinear(WeightOnlyLinear):
    """int8 weights [out, in] with one scale per output channel: `_weight_int8pack_mm` on CPU."""

    bits = 8

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group_size: int | None):
        super().__init__(q, scale, bias, group_size)
        self.register_buffer("weight_int8", q.contiguous(), persistent=False)
        self.register_buffer("kernel_scale", scale.view(-1).to(KERNEL_DTYPE), persistent=False)

    def int_weight(self) -> torch.Tensor:
        return self.weight_int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.group_size is not None:
            return self._add_bias(self._fallback(x))
        x2d = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        y = torch.ops.aten._weight_int8pack_mm(x2d, self.weight_int8, self.kernel_scale)
        return self._add_bias(y.view(*x.shape[:-1], self.out_features).to(x.dtype))


class Int4WeightLinear(WeightOnlyLinear):
    """int4 weights with one scale per group of input channels. On CPU (group 32/64/128/256, rows a multiple of 16)
    the weight is held in the layout `_convert_weight_to_int4pack_for_cpu` makes, two values a byte; elsewhere two
    values a byte in row order, dequantised by each forward. Moving the module between devices converts."""

    bits = 4

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group_size: int | None):
        super().__init__(q, scale, bias, group_size)
        self.register_buffer("weight_int4", self._pack(q.to(scale.device)), persistent=False)
        scales = scale.t().to(KERNEL_DTYPE)  # [groups, out], beside zero offsets: the kernel's scales_and_zeros
        self.register_buffer("kernel_scales_and_zeros", torch.stack([scales, torch.zeros_like(scales)], dim=-1)
                             .contiguous(), persistent=False)

    def _kernel_fits(self, device: torch.device) -> bool:
        return device.type == "cpu" and self.group in KERNEL_GROUP_SIZES and self.out_features % 16 == 0

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        unsigned = (q.to(torch.int32) + 8).contiguous()
        self.kernel_layout = self._kernel_fits(q.device)
        if self.kernel_layout:
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        unsigned = unsigned.to(torch.uint8).view(self.out_features, -1, 2)
        return unsigned[..., 0] | unsigned[..., 1] << 4

    def int_weight(self) -> torch.Tensor:
        packed = self.weight_int4
        if self.kernel_layout:
            return _from_cpu_int4pack(packed.cpu(), self.out_features, self.in_features).to(packed.device)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).view(self.out_features, self.in_features)
        return (nibbles.to(torch.int16) - 8).to(torch.int8)

    def _apply(self, fn, recurse: bool = True):  # nn.Module's signature
        moved = super()._apply(fn, recurse)
        if self.kernel_layout != self._kernel_fits(self.weight_int4.device):
            self.weight_int4 = self._pack(self.int_weight())  # the layout belongs to the device: repack for the new one
        return moved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.kernel_layout and x.device.type == "cpu"):
            return self._add_bias(self._fallback(x))
        x2d = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.weight_int4, self.group,
                                                       self.kernel_scales_and_zeros)
        return self._add_bias(y.view(*x.shape[:-1], self.out_features).to(x.dtype))


def _from_cpu_int4pack(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """q int8 [rows, cols] back from `_convert_weight_to_int4pack_for_cpu`'s opaque (CPU-dependent) layout.

    That layout is a fixed shuffle of 4-bit slots within each block of rows, so it is found by converting probes
    that hold each element's own index, one hex digit at a time, and reading where every digit lands."""
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).view(-1).to(torch.int16)
    out = torch.empty(rows * cols, dtype=torch.int16)
    for start in range(0, rows, _CPU_BLOCK_ROWS):
        n = min(_CPU_BLOCK_ROWS, rows - start)
        source = _int4pack_sources(n, cols)
        out[start * cols + source] = nibbles[start * cols:(start + n) * cols]
    return (out - 8).to(torch.int8).view(rows, cols)


def _int4pack_sources(rows: int, cols: int) -> torch.Tensor:
    """For each 4-bit slot of the converted [rows, cols] weight, the flat index of the element it holds."""
    index = torch.arange(rows * cols, dtype=torch.int64)
    source = torch.zeros(rows * cols, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(rows * cols, 16)))):
        probe = ((index >> (4 * digit)) & 15).to(torch.int32).view(rows, cols)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        slots = torch.stack([packed & 15, packed >> 4], dim=-1).view(-1).to(torch.int64)
        source |= slots << (4 * digit)
    return source


LINEARS = {"int8": Int8WeightLinear, "int4": Int4WeightLinear}


# ---- applying it to a model -----------------------------------------------------------------------------------

def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears weight-only quantisation replaces: every nn.Linear of the decoder layers, and the output head
    unless it shares the embedding table. Refuses a model that is already quantised or has no such layers."""
    from foundry.model.quantized import QuantizedLinear

    if any(isinstance(m, (WeightOnlyLinear, QuantizedLinear)) for m in model.modules()):
        raise UserError("the model is already quantised; quantise the original (unquantised) model instead")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__} is not a decoder transformer (no model.layers); weight-only "
                        f"quantisation applies to foundry's Transformer")
    found = {f"model.layers.{name}": m for name, m in layers.named_modules() if type(m) is nn.Linear}
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear and head.weight is not model.model.embed_tokens.weight:
        found["lm_head"] = head
    if not found:
        raise UserError(f"{type(model).__name__} has no nn.Linear layers in its decoder layers to quantise")
    return found


def check_group_size(linears: dict[str, nn.Linear], scheme: str, group_size: int | None) -> int | None:
    """The group size the scheme uses (None for int8's per-channel scales), checked against every layer."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantisation scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int8":
        if group_size is not None:
            raise UserError("--group-size applies to int4 only; int8 has one scale per output channel")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size < 2 or group_size % 2:
        raise UserError(f"group size {group_size} must be an even number >= 2 (e.g. 32, 64 or 128)")
    for name, linear in linears.items():
        if linear.in_features % group_size:
            fits = [g for g in (128, 64, 32, 16, 8, 2) if g <= group_size and linear.in_features % g == 0]
            raise UserError(f"group size {group_size} does not divide {name}'s {linear.in_features} input features; "
                            f"use --group-size {fits[0] if fits else 2}")
    return group_size


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None) -> int:
    """Replace the model's decoder linears (and an untied head) by int8 or int4 weight-only ones, in place;
    returns how many. Embeddings and norms keep their dtype. int4's group_size defaults to DEFAULT_GROUP_SIZE."""
    linears = quantizable_linears(model)
    group_size = check_group_size(linears, scheme, group_size)
    for name, linear in linears.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LINEARS[scheme].from_linear(linear, group_size))
    return len(linears)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every weight-only linear by an nn.Linear holding its dequantised weight, in place; returns how many.

    The result computes exactly what the integers and scales define, in `dtype` (the CPU kernels meet them with
    bf16 activations instead): a reference for the quantised model, and a way back to a plain one."""
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, WeightOnlyLinear)]
    for name, module in swapped:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                           device=module.weight_scale.device)
        linear.weight.copy_(module.dequantize(dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return len(swapped)


def quantization_of(model: nn.Module) -> tuple[str, int | None] | None:
    """(scheme, group size or None) of a weight-only quantised model; None when it has no such layers."""
    found = {(m.bits, m.group_size) for m in model.modules() if isinstance(m, WeightOnlyLinear)}
    if not found:
        return None
    if len(found) > 1:
        raise UserError(f"the model mixes quantisation schemes {sorted(map(str, found))}; foundry writes one "
                        f"scheme per model")
    bits, group_size = found.pop()
    return ("int8" if bits == 8 else "int4"), group_size


__all__ = ["DEFAULT_GROUP_SIZE", "SCHEMES", "Int4WeightLinear", "Int8WeightLinear", "WeightOnlyLinear",
           "dequantize_model", "pack_int32", "quantizable_linears", "quantization_of", "quantize_model", "quantize_weight", "unpack_int32"]
