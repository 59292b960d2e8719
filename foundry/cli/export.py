"""`foundry export`: a model directory in another dtype or shard size, loadable by transformers, or one GGUF
file for llama.cpp and Ollama."""

from __future__ import annotations

import argparse

from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError

_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}
_GGUF_TYPES = ("f32", "f16", "q8_0")
_DEFAULT_SHARD_SIZE = "5GB"


def _cmd_export(args: argparse.Namespace) -> None:
    if args.format == "gguf":
        _export_gguf(args)
        return
    if args.type is not None:
        raise UserError("--type applies to --format gguf only; for a Hugging Face directory use --dtype")
    import torch

    from foundry.hub import export

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    shard_size = args.shard_size or _DEFAULT_SHARD_SIZE
    out = export(args.model, args.out, dtype=dtype, shard_size=shard_size, trust_pickle=args.trust_pickle)
    print(f"wrote {out} (loads with transformers' AutoModelForCausalLM.from_pretrained)")


def _export_gguf(args: argparse.Namespace) -> None:
    for flag, value in (("--dtype", args.dtype), ("--shard-size", args.shard_size)):
        if value is not None:
            raise UserError(f"{flag} applies to --format hf only; a GGUF file is one file, its weights set by --type")
    from foundry.hub.gguf import write_gguf

    result = write_gguf(args.model, args.out, args.type or "f16", trust_pickle=args.trust_pickle)
    print(f"wrote {result.path} ({result.architecture}, {result.type}, {len(result.tensor_types)} tensors; "
          f"runs in llama.cpp and Ollama)")
    if result.kept_f16:
        print(f"{len(result.kept_f16)} tensors kept in f16, their rows not a multiple of 32 as q8_0 needs: "
              f"{', '.join(result.kept_f16)}")
    for note in result.notes:
        print(f"note: {note}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `export` verb."""
    p = add_verb(sub, "export", _cmd_export,
             "Write a model as a Hugging Face directory: safetensors shards, config.json, generation_config.json "
             "and tokenizer files, loadable by transformers as it is. With --format gguf, write one GGUF file "
             "(weights, tokenizer and chat template) that llama.cpp and Ollama run.")
    p.add_argument("model", help="model directory, run directory or Hugging Face Hub id (org/name[@revision])")
    p.add_argument("--out", required=True,
                   help="directory to create (must not exist or be empty); with --format gguf, the .gguf file")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: a Hugging Face model directory; gguf: one file for llama.cpp and Ollama")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weight dtype to write (default: the model's own)")
    p.add_argument("--shard-size", help="largest weight file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--type", choices=_GGUF_TYPES,
                   help="GGUF weight type (--format gguf only; default f16): f32, f16, or q8_0 (8-bit blocks; "
                        "norms and biases stay f32)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pytorch_model.bin checkpoint (read with torch.load(weights_only=True))")
