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


# ---- parser -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one sub-parser per verb."""
    parser = argparse.ArgumentParser(prog="foundry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_info,):
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
