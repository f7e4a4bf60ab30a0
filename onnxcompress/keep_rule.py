"""The `keep=` rule of the passes that rewrite layers: which layers a user leaves as they are.
Comma-separated tokens: `first` and `last` (the pass's layers in graph order), `classifier`
(the model's last layer with a weight, when the pass can take it and others) and fnmatch
patterns on node names (case-sensitive); `none` keeps nothing."""

from __future__ import annotations

import fnmatch

from onnxcompress.errors import CompressError
from onnxcompress.passkit import comma_list


def kept_layers(
    names: list[str], keep: str | None, option: str, classifier: str | None = None
) -> dict[int, str]:
    """Index of each kept layer among `names` (graph order) → why, naming `option`;
    `classifier`: the name the token `classifier` stands for."""
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
        elif token == "classifier":
            # A model the pass can cut in one layer only: that layer is what the user asked for.
            if classifier in names and len(names) > 1:
                why = f"the model's last weighted layer, its classifier or output ({option})"
                kept.setdefault(names.index(classifier), why)
        else:
            for index, name in enumerate(names):
                if fnmatch.fnmatchcase(name, token):
                    kept.setdefault(index, f"name matches '{token}' ({option})")
    return kept
