"""Errors the tool turns into one line on stderr and an exit code."""


class CompressError(Exception):
    """Bad input or bad option: the CLI prints the message on one line and exits 2."""

    exit_code = 2
