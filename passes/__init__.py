"""The passes, one module each, installed as `onnxcompress.passes`. Importing this package
imports every module, and each registers itself in `onnxcompress.registry`."""

from __future__ import annotations

from onnxcompress.passes import (  # noqa: F401  (importing registers them)
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

from onnxcompress.registry import all_passes, get_pass, register

__all__ = ["all_passes", "get_pass", "register"]
