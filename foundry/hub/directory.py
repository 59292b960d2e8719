"""Model directories (the Hugging Face layout of DESIGN.md): find them (locally or on the Hub), load and save them."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import torch

from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.core.files import atomic_dir, write_json
from foundry.hub.download import MODEL_FILES, complete_snapshot, fetch, is_hub_id
from foundry.hub.run_dir import latest_checkpoint
from foundry.hub.sharded import is_sharded, read_sharded_state
from foundry.hub.weights import (DEFAULT_SHARD_SIZE, has_weights, layout_of, parse_size, read_tensors,
                                 weight_files, write_tensors)
from foundry.model import Transformer
from foundry.model.weight_only import quantization_of

# Files written beside the weights that describe the tokenizer; `export` copies them as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja")


@dataclass
class LoadedModel:
    """A model directory loaded into memory."""

    model: Transformer
    config: ModelConfig
    path: Path
    tokenizer: Any = None  # foundry.tokenizer.Tokenizer when the directory has one
    generation_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # foundry.json


def resolve_model_dir(spec: str | Path, revision: str | None = None, token: str | bool | None = None,
                      cache_dir: str | Path | None = None, trust_pickle: bool = False) -> Path:
    """A model directory from a path to one, to a run directory (its newest checkpoint), or a Hub id.

    Hub ids ("org/name", "org/name@revision") go through huggingface_hub: its cache, HF_TOKEN and
    HF_HUB_OFFLINE apply as they do for transformers."""
    patterns = MODEL_FILES + (["*.bin"] if trust_pickle else [])
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        if has_weights(path):
            return path
        return complete_snapshot(path, patterns) or path  # a Hub snapshot holding only config.json so far
    if (path / "adapter_config.json").is_file():
        return path  # a LoRA adapter (PEFT layout): `load` loads its base and folds it in
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is not None:
            return ckpt
        raise UserError(f"{path} is neither a model directory (it has no config.json) nor a run directory "
                        f"with a complete checkpoint")
    if path.exists():
        raise UserError(f"{path} is a file; give a model directory (with config.json) or a Hub id")
    if is_hub_id(spec):
        return fetch(str(spec), patterns, revision, token, cache_dir)
    raise UserError(f"model {str(spec)!r} not found: give a model directory, a run directory or a Hub id")


def read_config(model_dir: Path) -> ModelConfig:
    """The ModelConfig of a model directory's config.json."""
    try:
        return ModelConfig.from_hf_dict(json.loads((model_dir / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {model_dir / 'config.json'}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    # transformers 5 writes "dtype", 4 wrote "torch_dtype".
    raw = _read_json(model_dir / "config.json")
    name = raw.get("dtype") or raw.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def read_state(model_dir: Path, config: ModelConfig, expected: dict[str, torch.Size], device: str | torch.device,
               dtype: torch.dtype | None, trust_pickle: bool = False, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A directory's weights under foundry's names, checked against `expected` (name -> shape): every name there,
    nothing else; HF names in `skip` are passed over (a tied or unused output head some files carry)."""
    return dict(iter_state(model_dir, config, expected, device, dtype, trust_pickle, skip))


def iter_state(model_dir: Path, config: ModelConfig, expected: dict[str, torch.Size], device: str | torch.device,
               dtype: torch.dtype | None, trust_pickle: bool = False,
               skip: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """read_state one tensor at a time (a sharded run copies each into its shards, never holding the whole model);
    the same checks, the missing names' once every file has been read."""
    layout = layout_of(config)
    kind, files = weight_files(model_dir, trust_pickle)
    seen: set[str] = set()
    unexpected = []
    # DeepSeek-V3's multi-token-prediction module is stored as the layers after the last (num_nextn_predict_layers);
    # foundry does not build it (neither does transformers), so its tensors are passed over.
    extra_layers_from = config.num_hidden_layers if config.extra.get("num_nextn_predict_layers") else None
    for hf_name, tensor in read_tensors(kind, files):
        if hf_name in skip or (extra_layers_from is not None and _layer_of(hf_name) >= extra_layers_from):
            continue
        try:
            parts = layout.to_foundry(hf_name, tensor, expected)
        except UserError as exc:
            raise UserError(f"{model_dir}: {exc}") from None
        if parts is None:
            unexpected.append(hf_name)
            continue
        for name, part in parts:
            seen.add(name)
            yield name, part.to(device=device, dtype=dtype or part.dtype)
    missing = [name for name in expected if name not in seen]
    if missing or unexpected:
        raise UserError(f"{model_dir}: the weights do not match config.json ({config.architecture}): "
                        + "; ".join(f"{len(names)} {what}, first {names[0]}"
                                    for what, names in (("missing", missing), ("unexpected", unexpected)) if names))


def _layer_of(name: str) -> int:
    """The decoder layer a tensor belongs to (-1 for the embeddings, head and final norm)."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def load_weights(model: Transformer, model_dir: Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, trust_pickle: bool = False) -> None:
    """Fill a (meta-device) model with a directory's weights, tensor by tensor, checking every name and shape."""
    config = model.config
    expected = {name: t.shape for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if is_sharded(model_dir):  # a distributed run's checkpoint: its ranks' shards, consolidated here
        state = read_sharded_state(model_dir, expected, device, dtype)
    else:
        skip = ("lm_head.weight",) if config.tie_word_embeddings else ()  # some files store the tied head too
        state = read_state(model_dir, config, expected, device, dtype, trust_pickle, skip)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.init_rotary(device)  # buffers were built on the meta device


def load(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         with_tokenizer: bool = True, *, revision: str | None = None, token: str | bool | None = None,
         cache_dir: str | Path | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load a model directory, a run directory's newest checkpoint, or a Hugging Face Hub model for use.

    The model is built on the meta device and filled with memory-mapped weights, so loading needs about one
    copy of them. dtype None keeps the checkpoint's dtype (config.json's, else the files')."""
    model_dir = resolve_model_dir(spec, revision, token, cache_dir, trust_pickle)
    if not (model_dir / "config.json").is_file() and (model_dir / "adapter_config.json").is_file():
        return _load_adapter_dir(model_dir, device, dtype, with_tokenizer, trust_pickle)
    config = read_config(model_dir)
    raw = _read_json(model_dir / "config.json")
    if "quantization_config" in raw:  # weight-only int8/int4 (compressed-tensors): the linears stay integers
        from foundry.hub.compressed import load_quantized

        model = load_quantized(model_dir, config, raw, device, dtype or _checkpoint_dtype(model_dir), trust_pickle)
    else:
        with torch.device("meta"):
            model = Transformer(config)
        load_weights(model, model_dir, device, dtype or _checkpoint_dtype(model_dir), trust_pickle)
    model.eval()
    tokenizer = None
    if with_tokenizer and (model_dir / "tokenizer.json").is_file():
        from foundry.tokenizer import Tokenizer  # tokenizers is imported only when a model has one

        tokenizer = Tokenizer.load(model_dir)
    return LoadedModel(model, config, model_dir, tokenizer,
                       _read_json(model_dir / "generation_config.json"), _read_json(model_dir / "foundry.json"))


def _load_adapter_dir(adapter_dir: Path, device: str | torch.device, dtype: torch.dtype | None,
                      with_tokenizer: bool, trust_pickle: bool) -> LoadedModel:
    """A LoRA adapter directory as a model: its base (adapter_config's base_model_name_or_path) with the adapter
    folded into the weights, checked against the base's fingerprint; the adapter's own tokenizer if it has one."""
    from foundry.hub.adapter import base_fingerprint, load_adapter, read_adapter_config
    from foundry.model.lora import merge_lora

    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path: load its base and "
                        f"the adapter with `foundry merge BASE {adapter_dir} --out DIR`")
    loaded = load(base, device, dtype, with_tokenizer, trust_pickle=trust_pickle)
    load_adapter(loaded.model, adapter_dir, base_fingerprint(loaded.path))
    merge_lora(loaded.model)
    tokenizer = loaded.tokenizer
    if with_tokenizer and (adapter_dir / "tokenizer.json").is_file():
        from foundry.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(adapter_dir)
    return LoadedModel(loaded.model, loaded.config, adapter_dir, tokenizer, loaded.generation_config,
                       _read_json(adapter_dir / "foundry.json"))


def write_model_files(model_dir: Path, model: Transformer, tokenizer: Any = None,
                      generation_config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                      dtype: torch.dtype | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE) -> None:
    """Write config, weights, tokenizer and metadata into an existing (usually temporary) directory.

    Weights go under the family's Hugging Face names (fused and transposed back where it has such tensors),
    sharded past shard_size. generation_config is written as given, with ids from the config filling gaps."""
    config = model.config
    if quantization_of(model) is not None:  # weight-only int8/int4: compressed-tensors' layout
        from foundry.hub.compressed import quantization_config, quantized_tensors

        tensors, written = quantized_tensors(model, dtype)
        write_tensors(model_dir, tensors, parse_size(shard_size))
        write_model_metadata(model_dir, config, written, tokenizer, generation_config, meta,
                             quantization_config(model))
        return
    state = dict(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    written = write_tensors(model_dir, layout_of(config).to_hf(state), parse_size(shard_size), dtype)
    write_model_metadata(model_dir, config, written, tokenizer, generation_config, meta)


def write_model_metadata(model_dir: Path, config: ModelConfig, dtype: torch.dtype, tokenizer: Any = None,
                         generation_config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                         quantization_config: dict[str, Any] | None = None) -> None:
    """Everything of a model directory but its weights: config.json (weights of `dtype`, quantised as
    `quantization_config` says, if given), generation_config.json, the tokenizer and foundry.json."""
    hf = config.to_hf_dict()
    hf.pop("quantization_config", None)  # read from a quantised directory, but these weights may not be
    if quantization_config is not None:
        hf["quantization_config"] = quantization_config
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_json(model_dir / "config.json", hf)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    gen.update(generation_config or {})
    write_json(model_dir / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    if tokenizer is not None:
        tokenizer.save(model_dir)
    if meta is not None:
        write_json(model_dir / "foundry.json", meta)


def _check_new_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty directory; choose another --out")


def _new_dir(out_dir: Path) -> None:
    _check_new_dir(out_dir)
    if out_dir.exists():
        out_dir.rmdir()  # atomic_dir renames a complete directory into place


def save(out_dir: str | Path, model: Transformer, tokenizer: Any = None,
         generation_config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
         dtype: torch.dtype | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
    """Save a complete model directory atomically (it appears whole or not at all)."""
    out_dir = Path(out_dir)
    _new_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_model_files(tmp, model, tokenizer, generation_config, meta, dtype, shard_size)
    return out_dir


def export(spec: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
           shard_size: str | int = DEFAULT_SHARD_SIZE, trust_pickle: bool = False) -> Path:
    """Re-write a model (directory, checkpoint or Hub id) as a directory transformers loads: safetensors shards,
    config.json, generation_config.json and the tokenizer files as they were."""
    out_dir = Path(out_dir)
    parse_size(shard_size)  # refuse bad arguments before any loading
    _check_new_dir(out_dir)
    loaded = load(spec, dtype=dtype, with_tokenizer=False, trust_pickle=trust_pickle)
    return save_loaded(out_dir, loaded, loaded.meta or None, dtype, shard_size)


def check_new_dir(out_dir: str | Path) -> None:
    """Refuse an --out that exists and is not an empty directory (before any loading)."""
    _check_new_dir(Path(out_dir))


def save_loaded(out_dir: str | Path, loaded: LoadedModel, meta: dict[str, Any] | None,
                dtype: torch.dtype | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
    """Save a loaded (perhaps since changed) model as a new directory, atomically: its weights, config and
    generation config, `meta` as foundry.json, and the tokenizer files of the directory it was loaded from."""
    out_dir = Path(out_dir)
    _new_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_model_files(tmp, loaded.model, None, loaded.generation_config, meta, dtype, shard_size)
        for name in TOKENIZER_FILES:
            if (loaded.path / name).is_file():
                shutil.copyfile(loaded.path / name, tmp / name)
    return out_dir
