"""The `keep=` rule of the passes that rewrite layers: which layers a user leaves as they are.
Comma-separated tokens: `first` and `last` (the pass's layers in graph order) and fnmatch
patterns on node names (case-sensitive); `none` keeps nothing."""

from __future__ import annotations

import fnmatch

from onnxcompress.errors import CompressError
from onnxcompress.passkit import comma_list


def kept_layers(names: list[str], keep: str | None, option: str) -> dict[int, str]:
    """Index of each kept layer among `names` (graph order) → why, naming `option`."""
    tokens = comma_list(keep)
    if keep is not None and not tokens:
        raise CompressError(f"{option} is empty: give first,last, patterns, or none")
    kept: dict[int, str] = {}
    if tokens == ["none"]:
        return kept
    for token in tokens:
        if token == "first" and names:
            kept.setdefault(0, f"first layer ({option})")
        elif token == "last" and names:
            kept.setdefault(len(names) - 1, f"last layer ({option})")
        else:
            for index, name in enumerate(names):
                if fnmatch.fnmatchcase(name, token):
                    kept.setdefault(index, f"name matches '{token}' ({option})")
    return kept
