"""`foundry info`: what a model is, in numbers (a table, or one JSON object with --json). Torch-free."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from foundry.cli.parsing import add_verb
from foundry.config import ModelConfig
from foundry.core.errors import UserError
from foundry.core.units import human_bytes, human_count
from foundry.hub import resolve_model_source
from foundry.hub.stored import checkpoint_dtype, read_json_if_any

BF16 = 2  # bytes per cached number in the KV-cache comparison
# The grouped-query layout latent attention is set against: 8 KV heads of width 128 (Llama 3 70B/405B, Qwen 2.5 72B).
GQA_HEADS, GQA_HEAD_DIM = 8, 128


def training_state(model_dir: Path) -> dict[str, Any]:
    """step, tokens and the last validation loss (with its step) of a checkpoint, from foundry.json and the
    run's metrics.jsonl; None where unknown."""
    meta = read_json_if_any(model_dir / "foundry.json") or {}
    step = meta.get("step") if isinstance(meta.get("step"), int) else None
    state: dict[str, Any] = {"step": step, "tokens": meta.get("tokens"), "val_loss": None, "val_loss_step": None}
    # metrics.jsonl (beside a run's step-N checkpoints) says at which step each evaluation ran.
    metrics = model_dir.parent / "metrics.jsonl" if model_dir.name.startswith("step-") else None
    for line in _lines(metrics) if metrics else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a run killed mid-write leaves a partial last line
        if isinstance(record, dict) and "val_loss" in record and (step is None or record.get("step", 0) <= step):
            state["val_loss"], state["val_loss_step"] = record["val_loss"], record.get("step")
    evaluation = meta.get("eval") if isinstance(meta.get("eval"), dict) else {}
    if state["val_loss"] is None and evaluation.get("val_loss") is not None:
        state["val_loss"] = evaluation["val_loss"]
    return state


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines() if path.is_file() else []
    except OSError:
        return []


def rope_settings(config: ModelConfig) -> dict[str, Any] | None:
    """theta, scaling type and factor, the original context and the rotated share of a head; None without RoPE."""
    if config.position_embedding != "rope":
        return None
    scaling = dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", "default")
    original = scaling.get("original_max_position_embeddings")
    factor = scaling.get("factor")
    if factor is None and original and kind in ("yarn", "longrope"):
        factor = config.max_position_embeddings / original  # both derive it so when the config leaves it out
    return {"theta": config.rope_theta, "scaling": None if kind == "default" else kind, "factor": factor,
            "original_context": original, "rotary_dim": config.rotary_dim, "head_dim": config.head_dim,
            "sliding_theta": config.sliding_rope_theta}


def expert_settings(config: ModelConfig) -> dict[str, Any] | None:
    """Routed and shared experts, top-k, router scoring and grouping, and which layers stay dense; None if dense."""
    if not config.num_experts:
        return None
    layers = range(config.num_hidden_layers)
    return {"routed": config.num_experts, "top_k": config.num_experts_per_tok, "expert_size": config.expert_size,
            "shared_size": config.shared_expert_intermediate_size, "shared_gate": config.shared_expert_gate,
            "scoring": config.router_scoring, "norm_topk_prob": config.norm_topk_prob,
            "groups": config.router_groups, "topk_groups": config.router_topk_groups,
            "routed_scaling_factor": config.routed_scaling_factor,
            "dense_layers": [i for i in layers if not config.is_moe_layer(i)]}


def kv_cache_settings(config: ModelConfig) -> dict[str, Any]:
    """KV-cache numbers and bf16 bytes per token (all layers); for latent attention also what caching the expanded
    heads, or a GQA of GQA_HEADS x GQA_HEAD_DIM, would take instead."""
    layers = config.num_hidden_layers
    heads, key, value = config.kv_cache_shape()
    out: dict[str, Any] = {"values_per_token": config.kv_cache_values_per_token(),
                           "bytes_per_token_bf16": config.kv_cache_values_per_token() * BF16,
                           "heads": heads, "key_width": key, "value_width": value, "latent": bool(config.kv_lora_rank)}
    if config.kv_lora_rank:
        expanded = layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * BF16
        gqa = layers * GQA_HEADS * 2 * GQA_HEAD_DIM * BF16
        out.update(expanded_bytes_per_token_bf16=expanded, gqa_bytes_per_token_bf16=gqa,
                   expanded_ratio=expanded / out["bytes_per_token_bf16"], gqa_ratio=gqa / out["bytes_per_token_bf16"])
    return out


def describe(spec: str, seq_len: int | None = None) -> dict[str, Any]:
    """Everything `foundry info` shows about a preset, config file, model directory, run directory or Hub id."""
    config, model_dir = resolve_model_source(spec)
    seq = seq_len or min(config.max_position_embeddings, 4096)
    total, emb = config.num_params(), config.embedding_params()
    layer_types = [config.layer_type(i) for i in range(config.num_hidden_layers)]
    info: dict[str, Any] = {
        "model": spec, "model_dir": str(model_dir) if model_dir else None,
        "architecture": config.architecture, "model_type": config.model_type,
        "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
        "latent_attention": {"kv_lora_rank": config.kv_lora_rank, "q_lora_rank": config.q_lora_rank,
                             "qk_nope_head_dim": config.qk_nope_head_dim, "qk_rope_head_dim": config.head_dim,
                             "v_head_dim": config.v_head_dim} if config.kv_lora_rank else None,
        "context_length": config.max_position_embeddings, "position_embedding": config.position_embedding,
        "rope": rope_settings(config),
        "sliding_window": config.sliding_window if "sliding_attention" in layer_types else None,
        "sliding_layers": layer_types.count("sliding_attention"),
        "parameters": total, "embedding_parameters": emb, "non_embedding_parameters": total - emb,
        "tied_embeddings": config.tie_word_embeddings,
        "active_parameters": config.num_params(active_only=True) if config.num_experts else None,
        "experts": expert_settings(config), "kv_cache": kv_cache_settings(config),
        "flops_seq_len": seq, "train_flops_per_token": config.train_flops_per_token(seq),
        "weight_bytes_fp32": config.weight_bytes(4), "weight_bytes_bf16": config.weight_bytes(2),
        "dtype": None, "step": None, "tokens": None, "val_loss": None, "val_loss_step": None,
    }
    if model_dir is not None:
        info["dtype"] = checkpoint_dtype(model_dir)
        info.update(training_state(model_dir))
    return info


def info_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(property, value) rows of the table, from describe()'s dict."""
    mla = info["latent_attention"]
    heads = (f"{info['attention_heads']} latent-attention heads" if mla else
             f"{info['attention_heads']} heads ({info['kv_heads']} KV) x {info['head_dim']}")
    rows = [
        ("architecture", f"{info['architecture']} ({info['model_type']})"),
        ("shape", (f"{info['layers']} layers, hidden {info['hidden_size']}, {heads}, "
                   f"MLP {info['intermediate_size']}, vocab {info['vocab_size']}")),
        ("context length", f"{info['context_length']:,} tokens"),
        ("positions", _positions(info)),
        ("attention", _attention(info)),
    ]
    if mla:
        queries = f"a rank-{mla['q_lora_rank']:,} latent" if mla["q_lora_rank"] else "the hidden state directly"
        latent = (f"keys and values from a rank-{mla['kv_lora_rank']:,} latent, queries from {queries}; per head "
                  f"q/k {mla['qk_nope_head_dim']} + rope {mla['qk_rope_head_dim']}, v {mla['v_head_dim']}")
        rows.append(("  latent attention", latent))
    tied = "tied" if info["tied_embeddings"] else "input + output"
    rows += [
        ("parameters", f"{info['parameters']:,} ({human_count(info['parameters'])})"),
        ("  embedding", f"{info['embedding_parameters']:,} ({tied})"),
        ("  non-embedding", f"{info['non_embedding_parameters']:,} ({human_count(info['non_embedding_parameters'])})"),
    ]
    if info["active_parameters"] is not None:
        rows.append(("  active per token", f"{info['active_parameters']:,} ({human_count(info['active_parameters'])})"))
    if info["experts"] is not None:
        rows += _expert_rows(info)
    rows += _kv_rows(info["kv_cache"])
    six_n = "6N (active)" if info["active_parameters"] is not None else "6N"
    attention = "6·L·H·(Q_k + Q_v)·T" if mla else "12·L·H·Q·T"
    rows += [
        (f"training FLOPs/token (seq {info['flops_seq_len']})",
         f"{info['train_flops_per_token']:.4g} ({six_n} + {attention})"),
        ("weights fp32", human_bytes(info["weight_bytes_fp32"])),
        ("weights bf16", human_bytes(info["weight_bytes_bf16"])),
    ]
    if info["model_dir"] is not None:
        rows.append(("checkpoint dtype", info["dtype"] or "unknown"))
        if info["step"] is not None:
            tokens = f", {info['tokens']:,} tokens" if isinstance(info["tokens"], int) else ""
            rows.append(("trained", f"step {info['step']:,}{tokens}"))
        if info["val_loss"] is not None:
            at = f" (step {info['val_loss_step']:,})" if info["val_loss_step"] is not None else ""
            rows.append(("last validation loss", f"{info['val_loss']:.4f}{at}"))
    return rows


def _expert_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    e = info["experts"]
    routing = f"{e['scoring']} scores"
    if e["groups"] > 1:
        routing += f", within the best {e['topk_groups']} of {e['groups']} groups"
    if e["norm_topk_prob"]:
        routing += ", weights renormalised"
    if e["routed_scaling_factor"] != 1:
        routing += f", scaled x{e['routed_scaling_factor']:g}"
    shared = ""
    if e["shared_size"]:
        gate = " gated" if e["shared_gate"] else ""
        shared = f" + a{gate} shared expert of width {e['shared_size']:,}"
    layers, dense = info["layers"], e["dense_layers"]
    if not dense:
        dense_text = f"none: all {layers} layers are mixture-of-experts"
    else:
        dense_text = f"{_ranges(dense)} (MLP {info['intermediate_size']:,}); experts in the other {layers - len(dense)}"
    return [("experts", f"{e['routed']} routed of width {e['expert_size']:,}, top-{e['top_k']} per token{shared}"),
            ("  routing", routing), ("  dense layers", dense_text)]


def _kv_rows(kv: dict[str, Any]) -> list[tuple[str, str]]:
    def size(n: int) -> str:
        return f"{n:,} B/token ({human_bytes(n)})"

    per_token = kv["bytes_per_token_bf16"]
    if not kv["latent"]:
        heads = f"{kv['heads']} KV heads x ({kv['key_width']} + {kv['value_width']}) per layer"
        return [("KV cache (bf16)", f"{size(per_token)}: {heads}")]
    expanded, gqa = kv["expanded_bytes_per_token_bf16"], kv["gqa_bytes_per_token_bf16"]
    return [("KV cache (bf16)", f"{size(per_token)}: latent {kv['key_width']} + rope {kv['value_width']} per layer"),
            ("  expanded heads instead", f"{size(expanded)}: {kv['expanded_ratio']:.1f}x the latent"),
            (f"  GQA {GQA_HEADS} x {GQA_HEAD_DIM} instead", f"{size(gqa)}: {kv['gqa_ratio']:.2f}x the latent")]


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> 'layers 0-2, 5'."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    return ("layer " if len(layers) == 1 else "layers ") + text


def _positions(info: dict[str, Any]) -> str:
    rope = info["rope"]
    if rope is None:
        return "learned absolute positions"
    text = f"RoPE, theta {rope['theta']:g}"
    if rope["scaling"]:
        text += f", {rope['scaling']} scaling"
        if rope["factor"] is not None:
            text += f" x{rope['factor']:g}"
        if rope["original_context"]:
            text += f" of an original {rope['original_context']:,} tokens"
    else:
        text += ", no scaling"
    if rope["rotary_dim"] != rope["head_dim"]:
        text += f"; rotates {rope['rotary_dim']} of {rope['head_dim']} head channels"
    if rope["sliding_theta"] is not None:
        text += f"; sliding layers theta {rope['sliding_theta']:g}"
    return text


def _attention(info: dict[str, Any]) -> str:
    window, sliding, layers = info["sliding_window"], info["sliding_layers"], info["layers"]
    if not sliding:
        return "full (causal) in every layer"
    if sliding == layers:
        return f"sliding window of {window:,} tokens in every layer"
    return f"sliding window of {window:,} tokens in {sliding} of {layers} layers, full in the others"


def show_info(spec: str, seq_len: int | None = None, as_json: bool = False) -> None:
    """Print the info of a preset, config file, model directory or run directory: a table, or one JSON object."""
    info = describe(spec, seq_len)
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    model_dir = info["model_dir"]
    title = f"{spec}" + (f"  ({model_dir})" if model_dir and model_dir != spec else "")
    rows = [("property", "value"), *info_rows(info)]
    console = Console()
    if not console.is_terminal:
        # Piped: plain lines that never wrap mid-number (a table would be cut to 80 columns).
        width = max(len(label) for label, _ in rows)
        sys.stdout.write(title + "\n" + "".join(f"{label:<{width}}  {value}\n" for label, value in rows))
        return
    table = Table(title=title)
    for header in rows[0]:
        table.add_column(header)
    for label, value in rows[1:]:
        table.add_row(label, value)
    console.print(table)


def _cmd_info(args: argparse.Namespace) -> None:
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len must be a positive number of tokens, got {args.seq_len}")
    show_info(args.model, args.seq_len, args.json)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `info` verb."""
    p = add_verb(sub, "info", _cmd_info, "Shape, context, RoPE and attention window, parameters, training FLOPs "
                 "per token and weight memory of a model; for a checkpoint also its dtype, step and last "
                 "validation loss.")
    p.add_argument("model", help="preset name, config YAML/JSON, model directory, run directory or Hub id")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length of the FLOPs figure (default: the context, at most 4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
