"""Torch versions of the ONNX shape, indexing, type and reduction ops TorchGraph runs
(`SHAPE_OPS`, same contract as torch_ops.OPS). Shapes, axes and indices are read as Python
ints: an int64 tensor in the graph becomes a list here."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from onnxcompress.train.torch_ops import DTYPES, Call, Op


def cast(call: Call) -> torch.Tensor:
    return call.inputs[0].to(DTYPES[call.attr("to")])


def shape(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    dims = list(x.shape)[call.attr("start", 0) : call.attr("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


def size(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


def reshape(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    dims = call.ints(1) if call.input(1) is not None else list(call.attr("shape"))
    if not call.attr("allowzero", 0):  # 0 copies the input's dim unless allowzero
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def flatten(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    axis = call.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def transpose(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    return x.permute(call.attr("perm", list(reversed(range(x.dim())))))


def concat(call: Call) -> torch.Tensor:
    return torch.cat([x for x in call.inputs if x is not None], dim=call.attr("axis"))


def split(call: Call) -> tuple[torch.Tensor, ...]:
    x, axis = call.inputs[0], call.attr("axis", 0)
    sizes = call.attr_or_input("split", 1)
    if not sizes:  # equal parts, the last one smaller when the dim does not divide
        sizes = math.ceil(x.shape[axis] / call.attr("num_outputs", call.n_outputs))
    return torch.split(x, sizes, dim=axis)


def slice_(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    if call.opset < 10:
        starts, ends, axes, steps = call.attr("starts"), call.attr("ends"), call.attr("axes"), None
    else:
        starts, ends, axes, steps = call.ints(1), call.ints(2), call.ints(3), call.ints(4)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        # Python's slice clamps starts and ends exactly as the ONNX spec does.
        kept = range(x.shape[axis])[slice(start, end, step)]
        if step > 0:
            index = [slice(None)] * (axis % x.dim()) + [slice(kept.start, kept.stop, step)]
            x = x[tuple(index)]
        else:
            x = x.index_select(axis, torch.tensor(list(kept), dtype=torch.long, device=x.device))
    return x


def gather(call: Call) -> torch.Tensor:
    data, indices = call.inputs
    axis = call.attr("axis", 0) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices).long()
    taken = data.index_select(axis, indices.reshape(-1))
    return taken.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def unsqueeze(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    axes = call.attr_or_input("axes", 1)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def squeeze(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    axes = call.attr_or_input("axes", 1)
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def expand(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(call.ints(1))))


def tile(call: Call) -> torch.Tensor:
    return call.inputs[0].repeat(call.ints(1))


def constant_of_shape(call: Call) -> torch.Tensor:
    value = call.attr("value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    if fill.dtype == np.float16:
        fill = fill.astype(np.float32)
    dtype = torch.from_numpy(fill.copy()).dtype
    return torch.full(call.ints(0), fill[0].item(), dtype=dtype)


def range_(call: Call) -> torch.Tensor:
    start, limit, delta = call.inputs
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


TORCH_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def pad(call: Call) -> torch.Tensor:
    x, mode = call.inputs[0], call.attr("mode", "constant")
    if call.opset < 11:
        pads, value, axes = call.attr("pads", call.attr("paddings")), call.attr("value", 0.0), None
    else:
        value = call.input(2).item() if call.input(2) is not None else 0.0
        pads, axes = call.ints(1), call.ints(3)
    rank = x.dim()
    axes = [a % rank for a in axes] if axes else list(range(rank))
    per_axis = dict(zip(axes, zip(pads[: len(axes)], pads[len(axes) :], strict=True), strict=True))
    # torch lists pads from the last dim back, and pads only trailing dims outside constant mode.
    first = min((a for a, pair in per_axis.items() if any(pair)), default=rank)
    torch_pads = [p for a in reversed(range(first, rank)) for p in per_axis.get(a, (0, 0))]
    if not torch_pads:
        return x
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    return F.pad(x, torch_pads, mode=TORCH_PAD_MODES[mode])


def crop(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    left, top, right, bottom = call.attr("border")
    height, width = x.shape[2] - top - bottom, x.shape[3] - left - right
    if call.attr("scale"):
        height, width = call.attr("scale")
    return x[:, :, top : top + height, left : left + width]


def _reduce(fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor]) -> Op:
    def run(call: Call) -> torch.Tensor:
        x = call.inputs[0]
        axes = call.attr_or_input("axes", 1)
        if not axes:
            if call.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [a % x.dim() for a in axes], bool(call.attr("keepdims", 1)))

    return run


def _product(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    for axis in sorted(axes, reverse=True):
        x = torch.prod(x, dim=axis, keepdim=keep)
    return x


def _arg(fn: Callable[..., torch.Tensor]) -> Op:
    def run(call: Call) -> torch.Tensor:
        keep = bool(call.attr("keepdims", 1))
        return fn(call.inputs[0], dim=call.attr("axis", 0), keepdim=keep)

    return run


SHAPE_OPS: dict[str, Op] = {
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "Cast": cast,
    "Concat": concat,
    "ConstantOfShape": constant_of_shape,
    "Crop": crop,
    "Expand": expand,
    "Flatten": flatten,
    "Gather": gather,
    "Pad": pad,
    "Range": range_,
    "ReduceL1": _reduce(lambda x, axes, keep: torch.sum(x.abs(), dim=axes, keepdim=keep)),
    "ReduceL2": _reduce(lambda x, axes, keep: torch.sum(x * x, dim=axes, keepdim=keep).sqrt()),
    "ReduceMax": _reduce(lambda x, axes, keep: torch.amax(x, dim=axes, keepdim=keep)),
    "ReduceMean": _reduce(lambda x, axes, keep: torch.mean(x, dim=axes, keepdim=keep)),
    "ReduceMin": _reduce(lambda x, axes, keep: torch.amin(x, dim=axes, keepdim=keep)),
    "ReduceProd": _reduce(_product),
    "ReduceSum": _reduce(lambda x, axes, keep: torch.sum(x, dim=axes, keepdim=keep)),
    "ReduceSumSquare": _reduce(lambda x, axes, keep: torch.sum(x * x, dim=axes, keepdim=keep)),
    "Reshape": reshape,
    "Shape": shape,
    "Size": size,
    "Slice": slice_,
    "Split": split,
    "Squeeze": squeeze,
    "Tile": tile,
    "Transpose": transpose,
    "Unsqueeze": unsqueeze,
}
