"""`foundry`: build the parser from the verb modules and run one verb."""

from __future__ import annotations

import argparse
import os
import sys

from foundry.cli import data, demo, export, finetune, generate, info, merge, plan, pretrain, serve
from foundry.cli import eval as eval_verbs  # `eval` and `lm-eval` (the name would shadow the builtin)
from foundry.core.errors import UserError

VERB_MODULES = (info, pretrain, finetune, demo, data, generate, plan, export, serve, eval_verbs, merge)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one sub-parser per verb."""
    parser = argparse.ArgumentParser(
        prog="foundry", description="Define, prepare data for, pretrain, generate with, serve, export and plan large "
        "language models. Every verb takes --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in VERB_MODULES:
        module.register(sub)
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
