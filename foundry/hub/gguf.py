"""GGUF export: a Llama-family model as one .gguf file, the format llama.cpp and Ollama run.

Names, metadata keys and the q/k row order follow llama.cpp's own converter (convert_hf_to_gguf.py). The
tokenizer travels inside the file as llama.cpp's byte-level BPE ("gpt2" model), named by its pre-tokenizer
split. 1-D tensors (norms, biases, RoPE factors) stay f32, as llama.cpp keeps them. The file is written one
tensor at a time under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.core.files import atomic_path
from foundry.hub.compressed import is_quantized_dir
from foundry.hub.directory import LoadedModel, load, read_config, resolve_model_dir
from foundry.hub.weights import layout_of
from foundry.model.weight_only import quantization_of
from foundry.tokenizer.tokenizer import END_OF_TURN_TOKENS, SPLIT_PATTERN

if TYPE_CHECKING:
    from foundry.tokenizer import Tokenizer

TYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantises rows in blocks of this many values

# Hugging Face architecture -> llama.cpp architecture. Mistral is plain llama to llama.cpp (its converter does
# the same). Qwen2 has its own: q/k/v biases and NEOX-style RoPE, whose pairs are HF's, so nothing is permuted.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

# tokenizer.json split regexes -> llama.cpp's pre-tokenizer names (llama-vocab.cpp matches on the name).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {SPLIT_PATTERN: "llama-bpe", _QWEN2_SPLIT: "qwen2"}  # SPLIT_PATTERN is Llama 3's split

# Hugging Face module names -> GGUF names ("{i}": the layer).
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class GGUFExport:
    """What write_gguf wrote."""

    path: Path
    architecture: str  # llama.cpp's name: "llama" or "qwen2"
    type: str  # the requested type: f32, f16 or q8_0
    tensor_types: dict[str, str]  # GGUF tensor name -> the type it was stored as (F32, F16, Q8_0)
    kept_f16: tuple[str, ...] = ()  # q8_0 was asked for, but their rows are not a multiple of 32
    notes: tuple[str, ...] = ()  # settings of the model the file does not carry, and what llama.cpp does instead


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    values: Callable[[], np.ndarray]  # float32 values in GGUF row order, computed only when written


# Dequantising int4 into q8_0 would keep int4's error at q8_0's size: better to start from the original weights.
_QUANTIZED = ("{} is weight-only quantised (compressed-tensors); export the unquantised model instead, with "
              "--type q8_0 for 8-bit GGUF weights")


def write_gguf(model: str | Path | LoadedModel, out_path: str | Path, type: str = "f16", *,
               trust_pickle: bool = False) -> GGUFExport:
    """Write a model (directory, run directory, Hub id or a LoadedModel) as a GGUF file of weight type
    f32, f16 or q8_0, with its tokenizer and chat template."""
    gguf = _import_gguf()
    if type not in TYPES:
        raise UserError(f"GGUF type {type!r} is not supported; choose one of {', '.join(TYPES)}")
    out = Path(out_path)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out or remove it")
    if not isinstance(model, LoadedModel):
        model_dir = resolve_model_dir(model, trust_pickle=trust_pickle)
        if (model_dir / "config.json").is_file():
            _llama_cpp_arch(read_config(model_dir))  # refuse before reading any weights
            if is_quantized_dir(model_dir):
                raise UserError(_QUANTIZED.format(model_dir))
        model = load(model_dir, trust_pickle=trust_pickle)
    if quantization_of(model.model) is not None:
        raise UserError(_QUANTIZED.format(model.path))
    config = model.config
    arch = _llama_cpp_arch(config)
    if model.tokenizer is None:
        raise UserError(f"{model.path} has no tokenizer.json, and a GGUF file carries its tokenizer: "
                        f"add the model's tokenizer files to the directory")
    tensors, kept_f16 = _plan(model.model, config, arch, type, gguf)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _add_model_metadata(writer, config, _model_name(model.path), type, gguf)
            _add_tokenizer(writer, model.tokenizer, config, gguf)
            for t in tensors:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t, gguf), raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                writer.write_tensor_data(_encode(t, gguf))
        finally:
            writer.close()
    return GGUFExport(out, arch, type, {t.name: t.qtype.name for t in tensors}, tuple(kept_f16), _notes(config))


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the `gguf` package: pip install 'foundry[gguf]'") from None
    return gguf


# ---- what llama.cpp can run -----------------------------------------------------------------------

def _llama_cpp_arch(config: ModelConfig) -> str:
    """llama.cpp's architecture for a config, or a one-line UserError naming what it cannot express."""
    arch = ARCHITECTURES.get(config.architecture)
    if arch is None:
        raise UserError(f"GGUF export supports llama-architecture models (Llama, Mistral) and Qwen2; "
                        f"{config.architecture} is not yet")
    kind = (config.rope_scaling or {}).get("rope_type", "default")
    unsupported = {
        "mixture-of-experts layers": bool(config.num_experts),
        f"hidden_act={config.hidden_act!r} (llama.cpp's {arch} runs SiLU)": config.hidden_act not in ("silu", "swish"),
        "mlp_bias": config.mlp_bias,
        "attention_bias": arch == "llama" and config.attention_bias,
        f"partial_rotary_factor={config.partial_rotary_factor}": config.partial_rotary_factor != 1.0,
        f"rope_scaling type {kind!r}": kind not in ("default", "linear") and not (kind == "llama3" and arch == "llama"),
    }
    for what, present in unsupported.items():
        if present:
            raise UserError(f"GGUF export of {config.architecture} with {what} is not supported yet")
    return arch


def _notes(config: ModelConfig) -> tuple[str, ...]:
    notes = []
    window = config.sliding_window
    if window is not None and window < config.max_position_embeddings:
        notes.append(f"sliding_window={window} is not carried: llama.cpp attends over the whole context, "
                     f"which matches this model up to {window} tokens")
    return tuple(notes)


# ---- tensors --------------------------------------------------------------------------------------

def _gguf_name(hf_name: str) -> str:
    module, _, param = hf_name.rpartition(".")
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{param}"
    match = _LAYER.match(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    raise UserError(f"tensor {hf_name} has no GGUF name in this exporter; GGUF export cannot write this model")


def _rope_pairs(values: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q or k (weight or bias) from HF's rotate-half order (each head: all first halves, then all
    second halves) to GGML's interleaved pairs (x0, y0, x1, y1, ...), as llama.cpp's llama arch rotates them."""
    half = values.shape[0] // heads // 2
    return values.reshape(heads, 2, half, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def _plan(model: torch.nn.Module, config: ModelConfig, arch: str, type: str, gguf: Any) -> tuple[list[_Tensor],
                                                                                                   list[str]]:
    q = gguf.GGMLQuantizationType
    wanted = {"f32": q.F32, "f16": q.F16, "q8_0": q.Q8_0}[type]
    state = dict(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when the file has no output.weight
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    tensors: list[_Tensor] = []
    kept_f16: list[str] = []
    for hf_name, tensor in layout_of(config).to_hf(state):
        name = _gguf_name(hf_name)
        match = _LAYER.match(hf_name)
        permute = heads.get(match.group(2)) if match and arch == "llama" else None
        qtype = wanted if tensor.dim() > 1 else q.F32
        if qtype == q.Q8_0 and tensor.shape[-1] % Q8_BLOCK:
            qtype = q.F16
            kept_f16.append(name)
        tensors.append(_Tensor(name, tuple(tensor.shape), qtype, _values(tensor, permute)))
    factors = _llama3_rope_factors(config)
    if factors is not None:
        tensors.append(_Tensor("rope_freqs.weight", tuple(factors.shape), q.F32, lambda: factors))
    return tensors, kept_f16


def _values(tensor: torch.Tensor, permute_heads: int | None) -> Callable[[], np.ndarray]:
    def compute() -> np.ndarray:
        values = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        return _rope_pairs(values, permute_heads) if permute_heads else values
    return compute


def _llama3_rope_factors(config: ModelConfig) -> np.ndarray | None:
    """llama.cpp's rope_freqs for Llama 3 RoPE scaling: per pair, the divisor of the unscaled frequency that
    gives the scaled one (computed from foundry's own frequencies, so the file rotates as this model does)."""
    if (config.rope_scaling or {}).get("rope_type") != "llama3":
        return None
    from foundry.model.rope import inverse_frequencies

    plain = inverse_frequencies(config.replace(rope_scaling=None))
    return (plain / inverse_frequencies(config)).to(torch.float32).numpy()


def _nbytes(t: _Tensor, gguf: Any) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(t.shape, t.qtype)))


def _encode(t: _Tensor, gguf: Any) -> np.ndarray:
    values = t.values()
    data = gguf.quants.quantize(values, t.qtype)
    if t.qtype.name == "F16" and not np.isfinite(data).all() and np.isfinite(values).all():
        raise UserError(f"tensor {t.name} has values beyond float16's range (largest |x| "
                        f"{float(np.abs(values).max()):.4g}); export with --type f32 or q8_0")
    return data


# ---- metadata -------------------------------------------------------------------------------------

def _model_name(path: Path) -> str:
    """general.name: the directory's name, or "org/name" for a Hub snapshot (.../models--org--name/snapshots/REV)."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.name


def _add_model_metadata(writer: Any, config: ModelConfig, name: str, type: str, gguf: Any) -> None:
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(file_types[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _add_tokenizer(writer: Any, tokenizer: Tokenizer, config: ModelConfig, gguf: Any) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec))
    tokens, types = _vocabulary(tokenizer, config.vocab_size, gguf)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])])
    eos = tokenizer.eos_id
    if eos is None and config.eos_token_id is not None:
        eos = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    ids = {"bos": tokenizer.bos_id if tokenizer.bos_id is not None else config.bos_token_id, "eos": eos,
           "pad": tokenizer.pad_id if tokenizer.pad_id is not None else config.pad_token_id}
    for key, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    end_of_turn = [i for i in map(tokenizer.token_to_id, END_OF_TURN_TOKENS) if i is not None and i != eos]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    # llama.cpp adds a bos by default for several pre-tokenizers (llama-bpe among them): say what ours does.
    plain, special = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(ids["bos"] is not None and special[:1] == [ids["bos"]] != plain[:1])
    writer.add_add_eos_token(eos is not None and special[-1:] == [eos] != plain[-1:])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer, or a UserError naming what it is."""
    model = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise UserError(f"GGUF export writes byte-level BPE tokenizers; this tokenizer.json has a "
                        f"{model.get('type')} model with a {decoder} decoder (SentencePiece-style tokenizers, as "
                        f"Llama 2 and Mistral v0.1 ship, are not supported yet)")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    raise UserError("GGUF export knows the GPT-2, Llama 3 and Qwen2 pre-tokenizer splits; this tokenizer.json "
                    "splits text another way, which llama.cpp would not reproduce")


def _vocabulary(tokenizer: Tokenizer, vocab_size: int, gguf: Any) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1; rows the tokenizer does not use are
    "[PAD<id>]" placeholders of type UNUSED, as llama.cpp's converter writes them."""
    kinds = gguf.TokenType
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())}, past the model's vocab_size "
                        f"{vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(kinds.UNUSED)] * vocab_size
    for text, token_id in vocab.items():
        tokens[token_id], types[token_id] = text, int(kinds.NORMAL)
    for token_id, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[token_id] = int(kinds.CONTROL if added.special else kinds.USER_DEFINED)
    return tokens, types


__all__ = ["ARCHITECTURES", "PRE_TOKENIZERS", "TYPES", "GGUFExport", "write_gguf"]
