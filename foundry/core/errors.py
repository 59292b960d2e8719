"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A problem with what the user gave us (a flag, a file, a request), worded for that user."""
