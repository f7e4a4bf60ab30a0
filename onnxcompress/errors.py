"""Errors the tool turns into one line on stderr and an exit code."""

# onnxruntime logs at this level and above (4: fatal only). Its errors reach the user anyway,
# as exceptions the tool turns into its one line; its coloured log lines would come first.
ORT_LOG_SEVERITY = 4


class CompressError(Exception):
    """Bad input or bad option: the CLI prints the message on one line and exits 2."""

    exit_code = 2


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-blank line of an exception's message (its type if it has none), cut to
    `limit` characters: library errors often carry pages of context the user does not need."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(exc).__name__
