"""Passes by name. Each pass module in `onnxcompress.passes` (the repo's `passes/` folder)
registers itself with `register`; the registry imports that package once, lazily, on the first
look-up, so the core never imports or names a pass itself."""

from __future__ import annotations

import importlib

from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassSpec

_PASSES: dict[str, PassSpec] = {}


def register(name: str, options: type, help: str, idempotent: bool = False, lossy: bool = False):
    """Decorator: register `fn(model, options, context) -> PassResult` under `name`;
    `idempotent`: a second run on the pass's own output changes nothing; `lossy`: the pass
    changes what the model computes (see `PassSpec`)."""

    def decorate(fn):
        if name in _PASSES:
            raise RuntimeError(f"pass {name} registered twice")
        _PASSES[name] = PassSpec(name, fn, options, help, idempotent, lossy)
        return fn

    return decorate


def all_passes() -> dict[str, PassSpec]:
    """Every registered pass by name."""
    importlib.import_module("onnxcompress.passes")  # its modules register on import
    return _PASSES


def get_pass(name: str) -> PassSpec:
    passes = all_passes()
    if name not in passes:
        raise CompressError(f"unknown pass '{name}'; passes are: {', '.join(sorted(passes))}")
    return passes[name]


def guide() -> list[tuple[PassSpec, str]]:
    """Every pass with when to use it, in the order the passes package's GUIDE advises
    trying them; passes it says nothing of come last, by name, with no advice."""
    passes = all_passes()
    advice = getattr(importlib.import_module("onnxcompress.passes"), "GUIDE", {})
    order = [name for name in advice if name in passes] + sorted(set(passes) - set(advice))
    return [(passes[name], advice.get(name, "")) for name in order]
