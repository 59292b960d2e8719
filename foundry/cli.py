"""foundry's command line: one sub-command per user verb; each parses, then calls one function."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from foundry.errors import UserError

Handler = Callable[[argparse.Namespace], int | None]


def _add(sub: argparse._SubParsersAction, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler)
    return parser


# ---- info -------------------------------------------------------------------------------

def _cmd_info(args: argparse.Namespace) -> None:
    from foundry.info import show_info

    show_info(args.model)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "info", _cmd_info, "Parameters, training FLOPs per token and weight memory of a model.")
    p.add_argument("model", help="preset name, config YAML/JSON, model directory or run directory")


# ---- export -----------------------------------------------------------------------------

_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def _cmd_export(args: argparse.Namespace) -> None:
    import torch

    from foundry.hub import export

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    out = export(args.model, args.out, dtype=dtype, shard_size=args.shard_size, trust_pickle=args.trust_pickle)
    print(f"wrote {out} (loads with transformers' AutoModelForCausalLM.from_pretrained)")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "export", _cmd_export,
             "Write a model as a Hugging Face directory: safetensors shards, config.json, generation_config.json "
             "and tokenizer files, loadable by transformers as it is.")
    p.add_argument("model", help="model directory, run directory or Hugging Face Hub id (org/name[@revision])")
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weight dtype to write (default: the model's own)")
    p.add_argument("--shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pytorch_model.bin checkpoint (read with torch.load(weights_only=True))")


# ---- parser -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one sub-parser per verb."""
    parser = argparse.ArgumentParser(prog="foundry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_info, _add_export):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one verb; bad input prints one line and exits 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except UserError as exc:
        print(f"foundry {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"foundry {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
