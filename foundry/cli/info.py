"""`foundry info`: what a model is, in numbers."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from foundry.config import ModelConfig
from foundry.core.units import human_bytes, human_count
from foundry.cli.parsing import add_verb
from foundry.hub import resolve_model_source


def info_rows(config: ModelConfig, seq_len: int) -> list[tuple[str, str]]:
    """(label, value) rows: parameters, training FLOPs per token, weight memory."""
    total, emb = config.num_params(), config.embedding_params()
    rows = [
        ("architecture", f"{config.architecture} ({config.model_type})"),
        ("shape", f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                  f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV) x {config.head_dim}, "
                  f"MLP {config.intermediate_size}, vocab {config.vocab_size}"),
        ("parameters", f"{total:,} ({human_count(total)})"),
        ("  embedding", f"{emb:,} ({'tied' if config.tie_word_embeddings else 'input + output'})"),
        ("  non-embedding", f"{total - emb:,} ({human_count(total - emb)})"),
    ]
    if config.num_experts:
        active = config.num_params(active_only=True)
        rows.append(("  active per token", f"{active:,} ({human_count(active)})"))
    flops = config.train_flops_per_token(seq_len)
    rows += [
        (f"training FLOPs/token (seq {seq_len})", f"{flops:.4g} (6N + 12·L·H·Q·T)"),
        ("weights fp32", human_bytes(config.weight_bytes(4))),
        ("weights bf16", human_bytes(config.weight_bytes(2))),
    ]
    return rows


def show_info(spec: str, seq_len: int | None = None) -> None:
    """Print the info table of a preset, config file, model directory or run directory."""
    config, model_dir = resolve_model_source(spec)
    seq = seq_len or min(config.max_position_embeddings, 4096)
    table = Table(title=f"{spec}" + (f"  ({model_dir})" if model_dir and str(model_dir) != spec else ""))
    table.add_column("")
    table.add_column("")
    for label, value in info_rows(config, seq):
        table.add_row(label, value)
    Console().print(table)


def _cmd_info(args: argparse.Namespace) -> None:
    show_info(args.model)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `info` verb."""
    p = add_verb(sub, "info", _cmd_info, "Parameters, training FLOPs per token and weight memory of a model.")
    p.add_argument("model", help="preset name, config YAML/JSON, model directory or run directory")
