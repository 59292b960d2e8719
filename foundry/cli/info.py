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
        "context_length": config.max_position_embeddings, "position_embedding": config.position_embedding,
        "rope": rope_settings(config),
        "sliding_window": config.sliding_window if "sliding_attention" in layer_types else None,
        "sliding_layers": layer_types.count("sliding_attention"),
        "parameters": total, "embedding_parameters": emb, "non_embedding_parameters": total - emb,
        "tied_embeddings": config.tie_word_embeddings,
        "active_parameters": config.num_params(active_only=True) if config.num_experts else None,
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
    rows = [
        ("architecture", f"{info['architecture']} ({info['model_type']})"),
        ("shape", f"{info['layers']} layers, hidden {info['hidden_size']}, {info['attention_heads']} heads "
                  f"({info['kv_heads']} KV) x {info['head_dim']}, MLP {info['intermediate_size']}, "
                  f"vocab {info['vocab_size']}"),
        ("context length", f"{info['context_length']:,} tokens"),
        ("positions", _positions(info)),
        ("attention", _attention(info)),
        ("parameters", f"{info['parameters']:,} ({human_count(info['parameters'])})"),
        ("  embedding", f"{info['embedding_parameters']:,} "
                        f"({'tied' if info['tied_embeddings'] else 'input + output'})"),
        ("  non-embedding", f"{info['non_embedding_parameters']:,} ({human_count(info['non_embedding_parameters'])})"),
    ]
    if info["active_parameters"] is not None:
        rows.append(("  active per token", f"{info['active_parameters']:,} ({human_count(info['active_parameters'])})"))
    rows += [
        (f"training FLOPs/token (seq {info['flops_seq_len']})",
         f"{info['train_flops_per_token']:.4g} (6N + 12·L·H·Q·T)"),
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
