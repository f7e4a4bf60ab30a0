"""The distribution random inputs are drawn from when no data is given: standard normal, or
uniform in an interval the user gives per input (`--input-range`), e.g. [-1, 1] for a model
documented to take values in that range."""

from __future__ import annotations

import math

import numpy as np

from onnxcompress.errors import CompressError

NORMAL = "standard normal N(0, 1)"


def input_ranges(
    dtypes: dict[str, np.dtype], fixed: dict, ranges: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """The checked interval of each random float input that has one ("" stands for all)."""
    drawn = [name for name in dtypes if name not in fixed]
    for name, (low, high) in ranges.items():
        _check(name, low, high, drawn, dtypes)
    default = ranges.get("")
    chosen = {name: ranges.get(name, default) for name in drawn}
    return {name: bounds for name, bounds in chosen.items() if bounds is not None}


def _check(name: str, low: float, high: float, drawn: list[str], dtypes: dict) -> None:
    shown = f"--input-range {name + ':' if name else ''}{low:g},{high:g}"
    if name and name not in drawn:
        what = "an input random data cannot stand in for" if name in dtypes else "not an input"
        raise CompressError(
            f"{shown}: '{name}' is {what}; random inputs are drawn for "
            f"{', '.join(drawn) or 'no input'}"
        )
    if not drawn:
        raise CompressError(f"{shown}: the model has no input drawn at random")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise CompressError(f"{shown}: expected finite numbers LO < HI")
    limit = min(float(np.finfo(dtypes[n]).max) for n in ([name] if name else drawn))
    if max(abs(low), abs(high)) > limit:
        raise CompressError(f"{shown}: beyond what the input's type holds (±{limit:g})")


def random_source(dtypes, fixed, ranges, seed: int) -> str:
    """The random inputs' distribution in words, for the report."""
    per_input = input_ranges(dtypes, fixed, ranges)
    kinds = {name: _kind(per_input.get(name)) for name in dtypes if name not in fixed}
    if len(set(kinds.values())) <= 1:
        return f"random, {next(iter(kinds.values()), 'no random input')}, seed {seed}"
    each = ", ".join(f"{name} {kind}" for name, kind in kinds.items())
    return f"random, seed {seed}: {each}"


def _kind(bounds: tuple[float, float] | None) -> str:
    return NORMAL if bounds is None else f"uniform in [{bounds[0]:g}, {bounds[1]:g}]"
