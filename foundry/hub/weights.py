"""Checkpoint weights: each family's tensor names, and reading and writing them as (sharded) safetensors.

Reading is lazy: `safe_open` memory-maps each file and hands out tensors backed by the mapping (copy-on-write),
so a model built on the meta device and filled with them holds one copy of the weights, paged in on use.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.core.files import fsync_dir, write_json

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DEFAULT_SHARD_SIZE = "5GB"
_ALWAYS_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some old Llama checkpoints carry


# ---- names -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """How a family's Hugging Face tensor names map onto foundry's (module paths; "{i}" is a layer index)."""

    renames: dict[str, str] = field(default_factory=dict)  # HF module -> foundry module
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # HF module -> foundry modules, stacked by rows
    conv1d: frozenset[str] = frozenset()  # HF modules whose weight is stored [in, out] (GPT-2's Conv1D)
    optional_prefix: str = ""  # a root prefix some files omit (GPT-2's "transformer.")
    ignored: re.Pattern | None = None  # HF tensors that are buffers, not weights

    def to_foundry(self, hf_name: str, tensor: torch.Tensor,
                   expected: dict[str, torch.Size]) -> list[tuple[str, torch.Tensor]] | None:
        """The foundry tensors in one checkpoint tensor (None: not a weight of this model).

        Raises UserError naming the tensor and both shapes when its shape disagrees with config.json."""
        if _ALWAYS_IGNORED.search(hf_name) or (self.ignored is not None and self.ignored.search(hf_name)):
            return []
        module, index, param = _parse(hf_name)
        known = self.renames.keys() | self.fused.keys()
        if module not in known and self.optional_prefix + module in known:
            module = self.optional_prefix + module
        transposed = module in self.conv1d and tensor.dim() == 2
        if module in self.fused:
            names = [_fill(part, index) + param for part in self.fused[module]]
        else:
            names = [_fill(self.renames.get(module, module), index) + param]
        if any(n not in expected for n in names):
            return None
        want = [expected[n] for n in names]
        stored_shape = torch.Size([sum(s[0] for s in want), *want[0][1:]])
        if transposed:
            stored_shape = torch.Size(reversed(stored_shape))
        if tensor.shape != stored_shape:
            raise UserError(f"tensor {hf_name} has shape {tuple(tensor.shape)} in the checkpoint, but config.json "
                            f"implies {tuple(stored_shape)}")
        if transposed:
            tensor = tensor.t().contiguous()
        if len(names) == 1:
            return [(names[0], tensor)]
        return list(zip(names, tensor.split([s[0] for s in want], dim=0)))

    def to_hf(self, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor) for a foundry state dict: renamed, fused and transposed back."""
        back = {v: k for k, v in self.renames.items()}
        part_of = {part: (hf, i) for hf, parts in self.fused.items() for i, part in enumerate(parts)}
        for name, tensor in state.items():
            module, index, param = _parse(name)
            if module in part_of:
                hf_module, position = part_of[module]
                if position:
                    continue  # emitted with the first part
                parts = [state[_fill(p, index) + param] for p in self.fused[hf_module]]
                tensor = torch.cat(parts, dim=0)
            else:
                hf_module = back.get(module, module)
            if hf_module in self.conv1d and tensor.dim() == 2:
                tensor = tensor.t()
            yield _fill(hf_module, index) + param, tensor


_INDEX_NAMES = ("{i}", "{j}")  # a layer index, then an expert index


def _parse(name: str) -> tuple[str, tuple[str, ...], str]:
    # "model.layers.3.mlp.experts.5.up_proj.weight" -> ("model.layers.{i}.mlp.experts.{j}.up_proj", ("3", "5"),
    # ".weight")
    module, _, param = name.rpartition(".")
    indices: list[str] = []

    def placeholder(match: re.Match) -> str:
        indices.append(match.group(1))
        return "." + (_INDEX_NAMES[len(indices) - 1] if len(indices) <= len(_INDEX_NAMES) else match.group(1))

    template = re.sub(r"\.(\d+)(?=\.|$)", placeholder, module)
    return template, tuple(indices[:len(_INDEX_NAMES)]), "." + param


def _fill(template: str, indices: tuple[str, ...]) -> str:
    for placeholder, index in zip(_INDEX_NAMES, indices):
        template = template.replace(placeholder, index)
    return template


_LAYER = "model.layers.{i}."
_GPT2 = "transformer.h.{i}."
_QKV = tuple(_LAYER + f"self_attn.{p}_proj" for p in "qkv")
LAYOUTS: dict[str, Layout] = {
    "phi3": Layout(fused={_LAYER + "self_attn.qkv_proj": _QKV,
                          _LAYER + "mlp.gate_up_proj": (_LAYER + "mlp.gate_proj", _LAYER + "mlp.up_proj")}),
    # Mixtral's Hub files keep the pre-2024 names of its MoE block (w1 gate, w3 up, w2 down).
    "mixtral": Layout(renames={_LAYER + "block_sparse_moe.gate": _LAYER + "mlp.gate", **{
        _LAYER + f"block_sparse_moe.experts.{{j}}.{w}": _LAYER + f"mlp.experts.{{j}}.{p}_proj"
        for w, p in (("w1", "gate"), ("w3", "up"), ("w2", "down"))}}),
    # Qwen2-MoE's one shared expert is `shared_expert`; foundry names every shared MLP as DeepSeek does.
    "qwen2_moe": Layout(renames={_LAYER + f"mlp.shared_expert.{p}_proj": _LAYER + f"mlp.shared_experts.{p}_proj"
                                 for p in ("gate", "up", "down")}),
    "gpt2": Layout(
        renames={"transformer.wte": "model.embed_tokens", "transformer.wpe": "model.embed_positions",
                 "transformer.ln_f": "model.norm", _GPT2 + "ln_1": _LAYER + "input_layernorm",
                 _GPT2 + "ln_2": _LAYER + "post_attention_layernorm",
                 _GPT2 + "attn.c_proj": _LAYER + "self_attn.o_proj",
                 _GPT2 + "mlp.c_fc": _LAYER + "mlp.up_proj", _GPT2 + "mlp.c_proj": _LAYER + "mlp.down_proj"},
        fused={_GPT2 + "attn.c_attn": _QKV},
        conv1d=frozenset(_GPT2 + m for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
        optional_prefix="transformer.",
        ignored=re.compile(r"(^|\.)attn\.(masked_)?bias$")),  # GPT-2's causal-mask buffers
}


def layout_of(config: ModelConfig) -> Layout:
    """The tensor-name layout of a config's family (most families use foundry's names as they are)."""
    return LAYOUTS.get(config.model_type, Layout())


# ---- reading -----------------------------------------------------------------------------------

def has_weights(model_dir: Path) -> bool:
    """Whether a directory holds weight files of any kind foundry reads."""
    return any((model_dir / name).is_file() for name in (SAFETENSORS, SAFETENSORS_INDEX, *PICKLES))


def weight_files(model_dir: Path, trust_pickle: bool = False) -> tuple[str, list[Path]]:
    """("safetensors" or "pickle", the weight files of a model directory in reading order)."""
    if (model_dir / SAFETENSORS).is_file():
        return "safetensors", [model_dir / SAFETENSORS]
    for kind, single, index in (("safetensors", SAFETENSORS, SAFETENSORS_INDEX), ("pickle", *PICKLES)):
        if (model_dir / index).is_file():
            files = _indexed_files(model_dir / index)
        elif (model_dir / single).is_file():
            files = [model_dir / single]
        else:
            continue
        if kind == "pickle" and not trust_pickle:
            raise UserError(f"{model_dir} has only pickle weights ({files[0].name}), which can run code when "
                            f"loaded; pass --trust-pickle (trust_pickle=True) to load them with "
                            f"torch.load(weights_only=True), or convert them to safetensors")
        return kind, files
    raise UserError(f"{model_dir} has no weights: expected {SAFETENSORS} or {SAFETENSORS_INDEX}")


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read the weight index {index}: {exc}") from None
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{index} lists {len(missing)} missing shard(s), first {missing[0]}: download it again")
    return files


def read_tensors(kind: str, files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files, one file open at a time; safetensors are memory-mapped."""
    for path in files:
        if kind == "pickle":
            yield from _read_pickle(path).items()
            continue
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path} is not a complete safetensors file ({exc}); it may be truncated: "
                            f"copy or download it again") from None
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    # weights_only=True unpickles tensors and plain containers only, never arbitrary objects.
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - any failure of an untrusted file is the file's fault
        raise UserError(f"cannot load {path} with torch.load(weights_only=True): {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return state


# ---- writing -----------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes in '5GB' (decimal units, as Hugging Face counts them), '500MiB' or a plain integer."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if match is None or match.group(2).upper() not in _UNITS:
        raise UserError(f"cannot read the size {size!r}: write e.g. 5GB, 500MB or 2GiB")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise UserError(f"size {size!r} must be positive")
    return value


def write_tensors(model_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int,
                  dtype: torch.dtype | None = None) -> torch.dtype | None:
    """Write tensors as model.safetensors, or shards plus an index past max_shard_bytes; returns their dtype.

    Tensors are converted and copied one shard at a time, so writing needs about one shard of extra memory."""
    shards: list[Path] = []
    weight_map: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    written_dtype = None

    def flush() -> None:
        path = model_dir / f".model-{len(shards) + 1:05d}.safetensors.tmp"
        save_file(current, str(path), metadata={"format": "pt"})
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        shards.append(path)
        current.clear()

    for name, tensor in tensors:
        tensor = tensor.detach().to("cpu", dtype if dtype is not None else tensor.dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name], weight_map[name] = tensor, len(shards)
        size, total, written_dtype = size + nbytes, total + nbytes, written_dtype or tensor.dtype
    flush()
    names = [SAFETENSORS] if len(shards) == 1 else \
        [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    for stale in [*model_dir.glob("model*.safetensors"), model_dir / SAFETENSORS_INDEX]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)  # an earlier save's files must not mix with these
    for tmp, name in zip(shards, names):
        os.replace(tmp, model_dir / name)
    if len(shards) > 1:
        write_json(model_dir / SAFETENSORS_INDEX, {"metadata": {"total_size": total},
                                                   "weight_map": {n: names[k] for n, k in weight_map.items()}})
    fsync_dir(model_dir)
    return written_dtype


def checked_state(tensors: Iterator[tuple[str, torch.Tensor]], expected: dict[str, torch.Size], where: str,
                  against: str, device: str | torch.device, dtype: torch.dtype | None,
                  rename: Callable[[str], str | None] = lambda name: name) -> dict[str, torch.Tensor]:
    """A file's tensors by model name, checked against `expected` (name -> shape): every name there, nothing
    else, each of its shape; refused in one line naming what is missing, unexpected or misshapen otherwise.

    rename(stored name) gives the model's name, or None for a tensor the model does not use (passed over)."""
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for stored, tensor in tensors:
        name = rename(stored)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(stored)
            continue
        if tensor.shape != expected[name]:
            raise UserError(f"{where}: tensor {stored} has shape {list(tensor.shape)}, {against} makes it "
                            f"{list(expected[name])}")
        state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    missing = [name for name in expected if name not in state]
    if missing or unexpected:
        raise UserError(f"{where}: the weights do not match {against}: "
                        + "; ".join(f"{len(names)} {what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                                    for what, names in (("missing", missing), ("unexpected", unexpected)) if names))
    return state
