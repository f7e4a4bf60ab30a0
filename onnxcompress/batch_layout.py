"""Which axis of each input holds the samples (its batch axis). A named batch dim says so; with
unnamed dynamic dims (`dim {}`) the pinned shapes and the calibration data decide, so that a
voice-activity model taking audio [?, ?] and state [2, ?, 128] batches on state's axis 1."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxcompress.errors import CompressError
from onnxcompress.graph import dim_values, runtime_inputs


@dataclass
class BatchLayout:
    """The batch axis of every input in graph order (None: no batch axis) and how it was known."""

    axes: dict[str, int | None]
    named: set[str] = field(default_factory=set)  # axis carries the model's batch symbol
    unsure: dict[str, list[int]] = field(default_factory=dict)  # first of several that fit

    def note(self) -> str:
        """'batch axis: audio 0, state 1' when any axis was decided here, not named by the model."""
        batched = {name: axis for name, axis in self.axes.items() if axis is not None}
        if set(batched) <= self.named:
            return ""
        parts = []
        for name, axis in batched.items():
            others = [str(a) for a in self.unsure.get(name, []) if a != axis]
            guess = f" (guessed; {', '.join(others)} also fits)" if others else ""
            parts.append(f"{name} {axis}{guess}")
        return "batch axis: " + ", ".join(parts)

    def refuse_if_unsure(self, name: str, pinned: list[int]) -> None:
        """Stop when the samples of `name` must be cut on an axis that was only guessed."""
        fits = self.unsure.get(name)
        if not fits:
            return
        example = ",".join("1" if a == fits[0] else str(d) for a, d in enumerate(pinned))
        raise CompressError(
            f"cannot tell which axis of input '{name}' holds the samples: axes "
            f"{', '.join(map(str, fits))} are dynamic and all pinned to {pinned[fits[0]]}; pin "
            f"the batch axis to 1 so that the data shows it (e.g. --input-shape {name}:{example}) "
            "or name the batch dim in the model"
        )


def batch_axes(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
) -> dict[str, int | None]:
    """The axis each input stacks samples on, None for inputs without one (see batch_layout)."""
    return batch_layout(model, input_shapes, arrays).axes


def batch_layout(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    arrays: dict[str, np.ndarray] | None = None,
) -> BatchLayout:
    """Each input's batch axis, from the first rule that decides it:

    1. the batch symbol (the first named leading dim among the inputs), where the input has it;
    2. the data: the one dynamic axis where the input's array differs from its pinned shape;
    3. the pins: the dynamic axis pinned to the batch size the inputs share;
    4. axis 0 (none for a fixed leading dim in a model with a batch symbol, or a scalar).
    """
    dims = {inp.name: dim_values(inp) for inp in runtime_inputs(model)}
    symbol = next((d[0] for d in dims.values() if d and isinstance(d[0], str)), None)
    pinned = input_shapes or {}
    decided = {name: d.index(symbol) for name, d in dims.items() if symbol and symbol in d}
    named = set(decided)
    for name, shape in dims.items():
        if name not in decided and name in pinned and arrays is not None and name in arrays:
            possible = _dynamic_axes(shape) or _as_list(_default_axis(shape, symbol))
            axis = _axis_shown_by_data(np.shape(arrays[name]), pinned[name], possible)
            if axis is not None:
                decided[name] = axis
    batch = _shared_batch(dims, pinned, decided)
    axes: dict[str, int | None] = {}
    unsure: dict[str, list[int]] = {}
    for name, shape in dims.items():
        if name in decided:
            axes[name] = decided[name]
            continue
        fits = [a for a in _dynamic_axes(shape) if name in pinned and pinned[name][a] == batch]
        if len(fits) > 1:
            unsure[name] = fits
        axes[name] = fits[0] if fits else _default_axis(shape, symbol)
    return BatchLayout(axes, named, unsure)


def _axis_shown_by_data(got: tuple, pinned: list[int], possible: list[int]) -> int | None:
    """The one axis where the data differs from the pinned shape, if it may be the batch."""
    if len(got) != len(pinned):
        return None
    differ = [axis for axis, (g, p) in enumerate(zip(got, pinned, strict=True)) if g != p]
    return differ[0] if len(differ) == 1 and differ[0] in possible else None


def _shared_batch(dims: dict, pinned: dict, decided: dict[str, int]) -> int | None:
    """The batch size the inputs are pinned to: at an input's known batch axis, else the one
    size every input pins on some dynamic dim, else the first dynamic leading dim's."""
    for name, axis in decided.items():
        if name in pinned:
            return pinned[name][axis]
    sizes = [
        {pinned[name][a] for a in _dynamic_axes(shape)}
        for name, shape in dims.items()
        if name in pinned and _dynamic_axes(shape)
    ]
    common = set.intersection(*sizes) if sizes else set()
    if len(common) == 1:
        return common.pop()
    leading = (pinned[n][0] for n, d in dims.items() if n in pinned and 0 in _dynamic_axes(d))
    return next(leading, None)


def _dynamic_axes(shape: list) -> list[int]:
    return [axis for axis, dim in enumerate(shape) if not isinstance(dim, int)]


def _default_axis(shape: list, symbol: str | None) -> int | None:
    # Today's rule: axis 0, except where the model names its batch and this input's lead is fixed.
    if shape and (symbol is None or not isinstance(shape[0], int)):
        return 0
    return None


def _as_list(axis: int | None) -> list[int]:
    return [] if axis is None else [axis]
