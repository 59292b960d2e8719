"""The command line: one module per verb group, and the only place that reads stdin or prints for a person.

`main` builds the parser from each verb module's `register`, runs one verb, and turns a UserError
into one line on stderr with exit status 2. Every verb imports its working modules lazily, so
`foundry plan` runs without torch. May import every other package of foundry.
"""

from foundry.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
