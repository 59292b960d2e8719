"""`foundry`: build the parser from the verb modules and run one verb."""

from __future__ import annotations

import argparse
import os
import sys
import time

from foundry.cli import data, demo, export, finetune, generate, info, merge, plan, pretrain, quantize, serve, vision
from foundry.cli import eval as eval_verbs  # `eval` and `lm-eval` (the name would shadow the builtin)
from foundry.core.errors import UserError

VERB_MODULES = (info, pretrain, finetune, demo, data, generate, plan, export, quantize, serve, eval_verbs, merge,
                vision)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.verb_argv = argv[argv.index(args.command) + 1:]  # what the verb was given, for --nproc to pass on
    try:
        code = args.handler(args)
    except UserError as exc:
        # In a distributed run rank 0 speaks for all, unless the message is this rank's own (a lost peer). The
        # others wait a moment, so that torchrun, which stops every worker once one has ended, lets it speak.
        if os.environ.get("RANK", "0") == "0" or getattr(exc, "every_rank", False):
            print(f"foundry {args.command}: error: {exc}", file=sys.stderr)
        else:
            time.sleep(10)
        return 2
    except KeyboardInterrupt:
        print(f"foundry {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
