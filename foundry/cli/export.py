"""`foundry export`: a model directory in another dtype or shard size, loadable by transformers."""

from __future__ import annotations

import argparse

from foundry.cli.parsing import add_verb


_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def _cmd_export(args: argparse.Namespace) -> None:
    import torch

    from foundry.hub import export

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    out = export(args.model, args.out, dtype=dtype, shard_size=args.shard_size, trust_pickle=args.trust_pickle)
    print(f"wrote {out} (loads with transformers' AutoModelForCausalLM.from_pretrained)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `export` verb."""
    p = add_verb(sub, "export", _cmd_export,
             "Write a model as a Hugging Face directory: safetensors shards, config.json, generation_config.json "
             "and tokenizer files, loadable by transformers as it is.")
    p.add_argument("model", help="model directory, run directory or Hugging Face Hub id (org/name[@revision])")
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weight dtype to write (default: the model's own)")
    p.add_argument("--shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pytorch_model.bin checkpoint (read with torch.load(weights_only=True))")
