"""LoRA adapters on disk in PEFT's layout, so that peft loads ours and foundry loads peft's.

    adapter/
      adapter_config.json         # peft's LoraConfig fields
      adapter_model.safetensors   # base_model.model.<HF module path>.lora_A.weight / .lora_B.weight
      foundry_adapter.json        # {"base_fingerprint": ...}: the base it was trained on (a file of its own, so
                                  # that adapter_config.json holds only fields peft knows and peft loads it quietly)

PEFT names modules by their Hugging Face paths. For families that store a layer under its own name (Llama,
Qwen2, Mistral, Qwen3, Gemma, OLMo 2, and Phi-3's o_proj/down_proj) that is foundry's path too; a layer a
family's checkpoints rename or fuse (Phi-3's qkv_proj, GPT-2's c_attn) cannot be named, and is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.core.files import atomic_path, write_json
from foundry.hub.stored import read_json_object
from foundry.hub.weights import layout_of
from foundry.model.lora import LoRASettings, apply_lora, load_lora_state, lora_layers
from foundry.model.quantized import QuantizedLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
FINGERPRINT_KEY = "base_fingerprint"
FINGERPRINT_FILE = "foundry_adapter.json"
# LoraConfig switches foundry's LoRALinear has no equivalent of: an adapter using one is refused, not half-loaded.
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
                "layer_replication", "target_parameters", "trainable_token_indices")
_SAMPLE = 64  # leading elements of each tensor that go into the weight digest
_CONFIG_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim")


def is_adapter_dir(path: str | Path) -> bool:
    """Whether a path is an adapter directory (it has adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json of an adapter directory, as a dict."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{adapter_dir} is not an adapter directory: it has no {ADAPTER_CONFIG}")
    return read_json_object(path)


# ---- the base model's identity -----------------------------------------------------------------

def base_fingerprint(base: str | Path | nn.Module) -> str:
    """A short hash naming a base model: its architecture and shapes, and the leading values of every tensor.

    `base` is a model directory (or anything foundry.hub.load takes) or a loaded Transformer (LoRA layers are
    looked through). Values are rounded to bfloat16 first, so an fp32 model and its bf16 export agree. Take it
    before quantize_frozen: a quantised weight is not the base's any more."""
    if isinstance(base, (str, Path)):
        from foundry.hub.directory import load

        base = load(base, with_tokenizer=False).model
    if any(isinstance(m, QuantizedLinear) for m in base.modules()):
        raise ValueError("base_fingerprint of a quantised model: take it before quantize_frozen")
    config: ModelConfig = base.config
    digest = hashlib.sha256(json.dumps({f: getattr(config, f, None) for f in _CONFIG_FIELDS}).encode())
    for name, tensor in sorted(_base_state(base).items()):
        if tensor.dim() == 0:
            continue
        if tensor.is_meta:
            raise ValueError("base_fingerprint needs real weights, not a model on the meta device")
        leading = tensor.detach()[(0,) * (tensor.dim() - 1)][:_SAMPLE]
        digest.update(name.encode())
        digest.update(leading.to("cpu", torch.bfloat16).float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # The state dict the model had before apply_lora: "x.base.weight" -> "x.weight", adapter weights dropped.
    wrapped = lora_layers(model)
    state = {}
    for name, tensor in model.state_dict().items():
        module, _, param = name.rpartition(".")
        if module.rpartition(".")[0] in wrapped:
            owner, _, part = module.rpartition(".")
            if part != "base":
                continue
            name = f"{owner}.{param}"
        state[name] = tensor
    return state


# ---- module names ------------------------------------------------------------------------------

def _checked_module_path(config: ModelConfig, path: str) -> str:
    """A module path that means the same in foundry and in the family's checkpoints (so in PEFT's keys)."""
    layout = layout_of(config)
    renamed = {*layout.renames, *layout.renames.values(), *layout.fused,
               *(part for parts in layout.fused.values() for part in parts)}
    template = re.sub(r"\.\d+(?=\.|$)", ".{i}", path, count=1)
    if template in renamed or layout.optional_prefix + template in renamed:
        raise UserError(f"{config.architecture} checkpoints store {path} renamed or fused with other tensors, so a "
                        f"PEFT adapter cannot name it; give LoRA targets stored under their own names (e.g. "
                        f"o_proj, down_proj), or use a Llama, Qwen2 or Mistral-style model")
    return path


def _target_modules(model: nn.Module, wrapped: set[str]) -> list[str] | str:
    """PEFT's target_modules: the short names when they pick exactly the wrapped modules, else a full-match regex."""
    plain = [name for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, QuantizedLinear)) and name.rpartition(".")[0] not in wrapped]
    short = sorted({name.rpartition(".")[2] for name in wrapped})
    same_named = {name for name in [*plain, *wrapped] if name.rpartition(".")[2] in short}
    if same_named == wrapped:
        return short
    return "(" + "|".join(re.escape(name) for name in sorted(wrapped)) + ")"


# ---- saving and loading ------------------------------------------------------------------------

def save_adapter(out_dir: str | Path, model: nn.Module, settings: LoRASettings, base_model_name_or_path: str,
                 base_fingerprint: str | None) -> Path:
    """Write a model's adapters into out_dir (created if missing; each file atomically) in PEFT's layout."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA adapters to save; apply_lora first")
    for name, layer in layers.items():
        if layer.rank != settings.rank or abs(layer.scaling - settings.scaling) > 1e-12:
            raise ValueError(f"LoRA layer {name} (rank {layer.rank}, scaling {layer.scaling}) does not match the "
                             f"settings (rank {settings.rank}, scaling {settings.scaling})")
    tensors = {}
    for name, layer in layers.items():
        hf_path = _checked_module_path(model.config, name)
        for ab in "AB":
            weight = getattr(layer, f"lora_{ab}").weight
            tensors[f"{PEFT_PREFIX}{hf_path}.lora_{ab}.weight"] = weight.detach().to("cpu").contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout, "use_rslora": settings.rslora,
        "target_modules": _target_modules(model, set(layers)), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(out_dir / FINGERPRINT_FILE, {FINGERPRINT_KEY: base_fingerprint})
    write_json(out_dir / ADAPTER_CONFIG, config)  # last: its presence marks a complete adapter
    return out_dir


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise UserError(f"{adapter_dir} has only adapter_model.bin (a pickle, which can run code); save the "
                            f"adapter as {ADAPTER_WEIGHTS} (peft's save_pretrained does by default)")
        raise UserError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is not a complete safetensors file ({exc}); copy or save it again") from None


def _settings_of(raw: dict[str, Any], adapter_dir: Path) -> LoRASettings:
    if raw.get("peft_type") != "LORA":
        raise UserError(f"adapter {adapter_dir} is of peft_type {raw.get('peft_type')!r}; foundry loads LORA "
                        f"adapters only")
    used = [key for key in _UNSUPPORTED if raw.get(key)]
    if raw.get("bias", "none") != "none":
        used.append(f"bias={raw['bias']!r}")
    if used:
        raise UserError(f"adapter {adapter_dir} uses {', '.join(used)}, which foundry's LoRA does not support; "
                        f"train it without")
    try:
        return LoRASettings(rank=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)),
                            dropout=float(raw.get("lora_dropout") or 0.0), rslora=bool(raw.get("use_rslora")))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: bad or missing LoRA field ({exc})") from None


def _trained_on(adapter_dir: Path) -> str | None:
    """The base fingerprint foundry recorded beside an adapter (None for one peft wrote)."""
    path = adapter_dir / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get(FINGERPRINT_KEY)
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{path} is not the JSON object foundry writes; delete it to load the adapter "
                        f"unchecked") from None


def load_adapter(model: nn.Module, adapter_dir: str | Path, base_fingerprint: str | None = None) -> LoRASettings:
    """Apply an adapter directory (ours or peft's) to a base model in place; returns its settings.

    With base_fingerprint given, an adapter that records another base's fingerprint is refused."""
    adapter_dir = Path(adapter_dir)
    raw = read_adapter_config(adapter_dir)
    settings = _settings_of(raw, adapter_dir)
    trained_on = _trained_on(adapter_dir)
    if trained_on and base_fingerprint and trained_on != base_fingerprint:
        base_name = raw.get("base_model_name_or_path")
        raise UserError(f"adapter {adapter_dir} was trained on another base model ({base_name or 'fingerprint'} "
                        f"{trained_on}; this base is {base_fingerprint}): load it onto the model it was trained on")
    state = {}
    for key, tensor in _read_weights(adapter_dir).items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise UserError(f"adapter {adapter_dir}: tensor {key} is not a LoRA linear weight (adapters on "
                            f"embeddings, biases or DoRA magnitudes are not supported)")
        path = _checked_module_path(model.config, match.group(1))
        if match.group(2) == "A" and tensor.shape[0] != settings.rank:
            raise UserError(f"adapter {adapter_dir}: {key} has rank {tensor.shape[0]}, adapter_config.json says "
                            f"r={settings.rank}")
        state[f"{path}.lora_{match.group(2)}.weight"] = tensor
    paths = sorted({key.rpartition(".lora_")[0] for key in state})
    if not paths:
        raise UserError(f"adapter {adapter_dir} holds no LoRA weights")
    modules = dict(model.named_modules())
    absent = [p for p in paths if not isinstance(modules.get(p), (nn.Linear, QuantizedLinear))]
    if absent:
        raise UserError(f"adapter {adapter_dir} adapts {absent[0]} ({len(absent)} such), which this "
                        f"{model.config.architecture} has no linear layer for: it was made for another model")
    for key, tensor in state.items():  # checked before anything is wrapped, so a refusal leaves the model as it was
        path, _, ab = key.removesuffix(".weight").rpartition(".lora_")
        linear = modules[path]
        want = (settings.rank, linear.in_features) if ab == "A" else (linear.out_features, settings.rank)
        if tuple(tensor.shape) != want:
            raise UserError(f"adapter {adapter_dir}: {key} has shape {tuple(tensor.shape)}, this model's {path} "
                            f"needs {want}: it was made for another model")
    settings.targets = paths
    apply_lora(model, settings)
    load_lora_state(model, state)
    return settings
