"""Registry of passes by name. Each pass is one module here with one public entry."""

from __future__ import annotations

from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassSpec

PASSES: dict[str, PassSpec] = {}


def register(name: str, options: type, help: str):
    """Decorator: register `fn(model, options, context) -> PassResult` under `name`."""

    def decorate(fn):
        if name in PASSES:
            raise RuntimeError(f"pass {name} registered twice")
        PASSES[name] = PassSpec(name=name, run=fn, options=options, help=help)
        return fn

    return decorate


def get_pass(name: str) -> PassSpec:
    if name not in PASSES:
        raise CompressError(f"unknown pass '{name}'; passes are: {', '.join(sorted(PASSES))}")
    return PASSES[name]


# Importing the modules registers them; keep this list in one place.
from passes import (  # noqa: E402, F401
    auto,
    blocks,
    channels,
    cp,
    fga,
    fold_bn,
    identity,
    int8,
    lrs,
    prune,
    rdprune,
    svd,
    tucker2,
    upcast,
)
