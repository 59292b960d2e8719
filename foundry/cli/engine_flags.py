"""How a model runs for inference, as flags shared by generate, chat, serve and eval: device, dtype, on-the-fly
quantisation, the compiled decode step and speculative decoding; and the engine those flags build."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from foundry.core.errors import UserError

if TYPE_CHECKING:  # imported when a verb runs: `foundry --help` needs no torch
    from foundry.infer.engine import Engine

# Mirrors foundry.infer.device, foundry.model.weight_only and foundry.infer.speculative (importing them here
# would import torch for `foundry --help`).
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
QUANTIZE_CHOICES = ("int8", "int4")
SPECULATIVE_CHOICES = ("ngram", "draft")
DTYPE_HELP = ("auto (fp32 on CPU, bf16 for a bf16 checkpoint on a CPU with native bf16; on a GPU bf16, or fp16 "
              "for an fp16 checkpoint), fp32, bf16 (refused where the CPU or GPU has no bf16 arithmetic), fp16 (GPU)")


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --quantize/--group-size (every verb that loads a model to run it)."""
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                   help="quantise the weights on loading (weight-only: int8 per channel, int4 in groups), as "
                        "`foundry quantize` does once and for all")
    p.add_argument("--group-size", type=int, default=None, metavar="N", help="--quantize int4: weights per scale")


def add_engine_flags(p: argparse.ArgumentParser, compiled_by_default: bool) -> None:
    """add_device_flags, plus the compiled decode step and speculative decoding (generate, chat, serve)."""
    add_device_flags(p)
    if compiled_by_default:
        p.add_argument("--eager", dest="compile", action="store_false",
                       help="run the decode step eagerly: no compile before the first token (tens of seconds the "
                            "first time on two cores, cached on disk after), slower tokens from then on. The "
                            "compiled step is the default on CPUs, where it is measured; --compile asks for it on a GPU")
        p.add_argument("--compile", dest="compile", action="store_true", help=argparse.SUPPRESS)
    else:
        p.add_argument("--compile", action="store_true",
                       help="compile the decode step: faster tokens after a compile of tens of seconds the first "
                            "time on two cores (cached on disk after); pays for long sessions")
    p.set_defaults(compile=None if compiled_by_default else False)  # None: compiled on a CPU (build_engine)
    p.add_argument("--speculative", default=None, choices=SPECULATIVE_CHOICES,
                   help="speculative decoding of greedy requests (the same tokens, fewer model steps): ngram "
                        "drafts from the text so far (prompt lookup; strong on code and edits), draft asks --draft")
    p.add_argument("--draft", default=None, metavar="MODEL",
                   help="a smaller model with the same tokenizer that drafts tokens (implies --speculative draft)")
    p.add_argument("--speculative-tokens", type=int, default=4, metavar="K", help="tokens drafted per step")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of build_engine that the flags of add_engine_flags set."""
    return {"device": args.device, "dtype": args.dtype, "compile": args.compile, "quantize": args.quantize,
            "group_size": args.group_size, "speculative": args.speculative, "draft": args.draft,
            "speculative_tokens": args.speculative_tokens}


def resolve_run_dtype(model_dir: Any, dtype: str, where: Any, err: TextIO | None = None) -> Any:
    """The torch dtype to run a model directory in for --dtype on device `where` (warnings to err)."""
    import torch

    from foundry.hub.stored import checkpoint_dtype
    from foundry.infer.device import resolve_dtype

    stored = getattr(torch, checkpoint_dtype(model_dir) or "", None)
    run_dtype, warning = resolve_dtype(dtype, where, stored if isinstance(stored, torch.dtype) else None)
    if warning:
        (err or sys.stderr).write(f"warning: {warning}\n")
    return run_dtype


def check_quantize_flags(quantize: str | None, group_size: int | None) -> None:
    """UserError for a --group-size without --quantize int4 (said before any model is loaded)."""
    if group_size is not None and quantize != "int4":
        raise UserError("--group-size is for --quantize int4 (int8 has one scale per output channel)")


def speculative_config(method: str | None, draft: str | None, tokens: int) -> Any:
    """The engine's SpeculativeConfig for the flags (None: no speculation)."""
    if draft is not None and method not in (None, "draft"):
        raise UserError(f"--draft gives a draft model, which --speculative {method} does not use: drop one of them")
    if method == "draft" and draft is None:
        raise UserError("--speculative draft needs --draft MODEL (a smaller model with the same tokenizer)")
    if method is None and draft is None:
        return None
    from foundry.infer.speculative import SpeculativeConfig

    return SpeculativeConfig(method=method or "draft", num_tokens=tokens)


def build_engine(model: str, device: str = "auto", compile: bool | None = False, dtype: str = "auto",
                 err: TextIO | None = None, kv_cache_memory: str | int | None = None,
                 max_batch_size: int | None = None, quantize: str | None = None, group_size: int | None = None,
                 speculative: str | None = None, draft: str | None = None, speculative_tokens: int = 4) -> "Engine":
    """The engine for a model (directory, run directory, Hub id) as the flags ask; compiles it now if asked
    (compile None: on a CPU, where the compiled step is measured, not on a GPU)."""
    from foundry import hub
    from foundry.hub.weights import parse_size
    from foundry.infer.device import resolve_device
    from foundry.infer.engine import Engine

    where = resolve_device(device)
    model_dir = hub.resolve_model_dir(model)  # a run directory's newest checkpoint, a Hub download
    if compile is None:  # the default: compiled on a CPU, except where the compiled step does not reach (MoE)
        compile = where.type == "cpu" and not hub.read_config(model_dir).num_experts
    run_dtype = resolve_run_dtype(model_dir, dtype, where, err)
    extra: dict = {}
    if kv_cache_memory is not None:
        try:
            extra["kv_cache_memory"] = parse_size(kv_cache_memory)
        except UserError as exc:
            raise UserError(f"--kv-cache-memory: {exc}") from None
    if max_batch_size is not None:
        if max_batch_size < 1:
            raise UserError(f"--max-batch-size must be at least 1, got {max_batch_size}")
        extra["max_batch_size"] = max_batch_size
    check_quantize_flags(quantize, group_size)
    spec = speculative_config(speculative, draft, speculative_tokens)
    engine = Engine.load(model_dir, device=where, dtype=run_dtype, compile=compile, quantize=quantize,
                         group_size=group_size, speculative=spec,
                         draft=None if draft is None else hub.resolve_model_dir(draft), **extra)
    if engine.tokenizer is None:
        raise UserError(f"{model} has no tokenizer.json: text generation needs the model's tokenizer")
    if compile:
        err = err or sys.stderr
        err.write("preparing the compiled decode step (tens of seconds the first time, then from the cache)...\n")
        start = time.perf_counter()
        engine.warm_up()
        cached = getattr(engine.compiled_step, "loaded_from_cache", {})  # CPU programs say
        how = "loaded from the cache" if cached and all(cached.values()) else "compiled"
        err.write(f"decode step {how} in {time.perf_counter() - start:.1f} s\n")
    return engine
