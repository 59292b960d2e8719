"""Shared argparse pieces: registering a verb, and the help formatter that shows every default."""

from __future__ import annotations

import argparse
import textwrap
from typing import Callable

Handler = Callable[[argparse.Namespace], "int | None"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` after every flag that has a default other than None or False, and keeps the
    paragraphs (blank-line separated) of a description or epilog apart."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return text + " (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
        return "\n\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent)
                           for p in paragraphs if p)


def add_verb(sub: argparse._SubParsersAction, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
    """A sub-command whose --help shows `help` and the defaults of its flags."""
    parser = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    parser.set_defaults(handler=handler)
    return parser
