"""LoRA: low-rank adapters wrapped around a model's linears from outside (the model's code is unchanged).

Conventions are PEFT's, so that adapters move between foundry and peft as they are: lora_A is
kaiming-uniform(a=sqrt(5)), lora_B starts at zero (the adapted model starts equal to the base), and the update
B(A(dropout(x))) is scaled by alpha/rank, or alpha/sqrt(rank) with rank-stabilised LoRA.

Targets (LoRASettings.targets), one rule for each string:
- "all-linear": every linear except the output head `lm_head` (PEFT's meaning);
- "re:PATTERN": modules whose full dotted name re.fullmatch-es PATTERN;
- anything else: the module whose full dotted name is that string, or whose name ends in "." + it
  ("q_proj" matches every layer's q_proj; "model.layers.0.mlp" matches nothing, it is not a linear).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from foundry.core.errors import UserError
from foundry.model.quantized import QuantizedLinear

ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"
LINEAR_TYPES = (nn.Linear, QuantizedLinear)


@dataclass
class LoRASettings:
    """Rank, scaling, dropout and the modules an adapter wraps."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: list[str] = field(default_factory=lambda: [ALL_LINEAR])

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"LoRA rank {self.rank} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout {self.dropout} must be in [0, 1)")
        if not self.targets:
            raise UserError("LoRA targets are empty: name modules (e.g. q_proj v_proj) or use all-linear")

    @property
    def scaling(self) -> float:
        """The factor on B(A(x)): alpha/rank, or alpha/sqrt(rank) with rslora (PEFT's definitions)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRALinear(nn.Module):
    """A frozen linear (`base`: nn.Linear or a quantised linear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = getattr(base, "weight", None)
        # The adapter lives where the base does, in its dtype (float32 beside a quantised base).
        device = weight.device if weight is not None else next(base.buffers()).device
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.scaling, self.enabled = rank, scaling, True
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """PEFT's initialisation: A kaiming-uniform, B zero, so the wrapped layer starts equal to its base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling [out, in] in float32: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, enabled={self.enabled}"


def _matches(name: str, target: str) -> bool:
    if target == ALL_LINEAR:
        return name.rpartition(".")[2] != OUTPUT_HEAD
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear-like modules (nn.Linear or quantised) of a model, by full name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules of a model, by full name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _shared_weights(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {key for key, n in counts.items() if n > 1}


def apply_lora(model: nn.Module, settings: LoRASettings) -> list[str]:
    """Wrap the linears `settings.targets` match in LoRALinear, in place; freeze every other parameter.

    Returns the names wrapped. Raises UserError when the targets match nothing."""
    if lora_layers(model):
        raise UserError("the model already has LoRA adapters; merge them (merge_lora) before adding others")
    for target in settings.targets:
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as exc:
                raise UserError(f"LoRA target {target!r} is not a regular expression: {exc}") from None
    linears = _linears(model)
    chosen = [name for name in linears if any(_matches(name, t) for t in settings.targets)]
    if not chosen:
        short = sorted({name.rpartition(".")[2] for name in linears})
        raise UserError(f"LoRA targets {', '.join(settings.targets)} match no linear layer of the model; its linears "
                        f"are named {', '.join(short[:12])} (give short names, full dotted names, 're:PATTERN' or "
                        f"{ALL_LINEAR})")
    shared = _shared_weights(model)
    for name in chosen:
        weight = getattr(linears[name], "weight", None)
        if weight is not None and id(weight) in shared:
            raise UserError(f"LoRA target {name} shares its weight with another layer (tied embeddings); "
                            f"leave it out of the targets")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                LoRALinear(linears[name], settings.rank, settings.scaling, settings.dropout))
    return chosen


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: "<module path>.lora_A.weight" and "<module path>.lora_B.weight"."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


@torch.no_grad()
def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (lora_state_dict's names) into a model with LoRA applied; every name must match."""
    layers = lora_layers(model)
    expected = {f"{name}.lora_{ab}.weight": getattr(layer, f"lora_{ab}").weight
                for name, layer in layers.items() for ab in "AB"}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise UserError("the adapter weights do not match the model's LoRA layers: "
                        + "; ".join(f"{len(names)} {what}, first {names[0]}"
                                    for what, names in (("missing", missing), ("unexpected", unexpected)) if names))
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, the model's LoRA layer "
                            f"{tuple(expected[name].shape)}")
        expected[name].copy_(tensor)


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold each adapter (B @ A * scaling) into its base weight and put a plain nn.Linear back; returns the names.

    A quantised base is dequantised first: the merged layer is a full-precision nn.Linear."""
    merged = []
    for name, layer in lora_layers(model).items():
        base = layer.base.to_linear() if isinstance(layer.base, QuantizedLinear) else layer.base
        if layer.enabled:
            base.weight.copy_((base.weight.float() + layer.delta_weight()).to(base.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
        merged.append(name)
    return merged


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model without its adapters (e.g. DPO's reference model), with no second copy of it."""
    layers = list(lora_layers(model).values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.enabled = state


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantised layer's frozen weights count in the total."""
    params = list(model.parameters())
    frozen_quantized = sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
                           for m in model.modules() if isinstance(m, QuantizedLinear))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params) + frozen_quantized
