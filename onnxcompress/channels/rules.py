"""How each op moves channels, for the walk in `channel_groups`.

A rule gets the walker, the node's index, the node and the layouts of its inputs (None where
an input carries no tracked channels) and returns the layouts of its outputs, recording the
edits surgery will need. It raises `Unmappable` when it cannot follow the channels.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.channels.groups import (
    Layout,
    Unmappable,
    Walker,
    channels_input,
    label,
    opaque,
    require_channels_on_axis_1,
)
from onnxcompress.channels.linear_rules import conv, conv_transpose, gemm, matmul

UNARY = set(
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Softplus Softsign Gelu Mish "
    "Erf Exp Log Abs Neg Sqrt Reciprocal Floor Ceil Round Sign Sin Cos Identity Dropout Clip "
    "Cast ThresholdedRelu Shrink".split()
)
POOLS = set("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
ELEMENTWISE = set("Add Sub Mul Div Pow Max Min Sum Mean PRelu".split())
REDUCE = set("ReduceMean ReduceMax ReduceMin ReduceSum ReduceL1 ReduceL2 ReduceSumSquare".split())
PRODUCER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}  # they start groups


def _unused_extra_outputs(w: Walker, node: onnx.NodeProto) -> None:
    for name in node.output[1:]:
        if w.used(name):
            raise Unmappable(f"its extra output '{name}' is used")


def unary(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    _unused_extra_outputs(w, node)
    return {node.output[0]: layout}


def pool(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    require_channels_on_axis_1(layout)
    _unused_extra_outputs(w, node)
    return {node.output[0]: layout}


def normalization(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    require_channels_on_axis_1(layout)
    _unused_extra_outputs(w, node)
    params = 4 if node.op_type == "BatchNormalization" else 2
    for k in range(1, 1 + params):
        value = w.const(node.input[k])
        if value is None or value.shape != (layout.channels,):
            raise Unmappable(f"parameter '{node.input[k]}' is not a constant per-channel vector")
        w.edit("param", i, layout, k, axis=0)
    return {node.output[0]: layout}


def layer_norm(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    axis = _axis(graph.node_attributes(node).get("axis", -1), layout.rank)
    if layout.axis >= axis:
        raise Unmappable("it normalises over the channel axis")
    _unused_extra_outputs(w, node)
    return {node.output[0]: layout}


def elementwise(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    """Add/Mul/... : activations are tied channel by channel; constants are sliced."""
    ranks = []
    for k, name in enumerate(node.input):
        dims = list(w.const(name).shape) if w.const(name) is not None else w.dims(name)
        if ins[k] is not None:
            ranks.append(ins[k].rank)
        elif dims is None:
            raise Unmappable(f"shape of '{name}' is unknown")
        else:
            ranks.append(len(dims))
    rank = max(ranks)
    tracked = [(k, ins[k].moved(ins[k].axis + rank - ins[k].rank, rank)) for k in _with(ins)]
    axes = {layout.axis for _, layout in tracked}
    if len(axes) != 1:
        raise Unmappable("its inputs' channel axes do not line up")
    (axis,) = axes
    width = max(layout.channels * layout.repeat for _, layout in tracked)
    wide = [layout for _, layout in tracked if layout.channels * layout.repeat == width]
    if any(layout.channels * layout.repeat not in (1, width) for _, layout in tracked):
        raise Unmappable("its inputs have different channel counts")
    for layout in wide[1:]:
        w.couple(wide[0], layout, f"{node.op_type} '{label(node)}'")
    for k, name in enumerate(node.input):
        if ins[k] is not None:
            continue
        dims = list(w.const(name).shape) if w.const(name) is not None else w.dims(name)
        local = axis - (rank - len(dims))
        size = dims[local] if local >= 0 else 1
        if size == 1:
            continue
        if size != width:
            raise Unmappable(f"'{name}' has {size} values on the channel axis, not {width}")
        if w.const(name) is not None:
            w.edit("param", i, wide[0], k, axis=local)
        else:
            w.fail(
                wide[0],
                f"{node.op_type} '{label(node)}' ties these channels to '{name}', "
                "whose channels cannot be pruned",
            )
    return {node.output[0]: wide[0]}


def concat(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    first = ins[_with(ins)[0]]
    axis = _axis(graph.node_attributes(node)["axis"], first.rank)
    if any(ins[k].axis != first.axis or ins[k].rank != first.rank for k in _with(ins)):
        raise Unmappable("its inputs carry channels on different axes")
    if axis != first.axis:  # joined along another axis: channel i of every input is one channel
        return elementwise(w, i, node, ins)
    if any(ins[k].repeat != 1 for k in _with(ins)):
        raise Unmappable("it joins flattened channels")
    segments = []
    for k, name in enumerate(node.input):
        if ins[k] is not None:
            segments += ins[k].segments
            continue
        dims = w.dims(name)
        if dims is None:
            raise Unmappable(f"shape of '{name}' is unknown")
        segments.append(opaque(dims[axis]))
    return {node.output[0]: Layout(axis, first.rank, tuple(segments))}


def split(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    attrs = graph.node_attributes(node)
    axis = _axis(attrs.get("axis", 0), layout.rank)
    if axis != layout.axis:
        return {out: layout for out in node.output if out}
    if layout.repeat != 1:
        raise Unmappable("it splits flattened channels")
    sizes = _split_sizes(w, node, layout.channels, attrs)
    outputs, start = {}, 0
    for out, size in zip(node.output, sizes, strict=True):
        piece = layout.cut(start, size)
        w.require_kept(piece)
        if out:
            outputs[out] = piece
        start += size
    w.edit("split", i, layout, sizes=sizes)
    return outputs


def slice_(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    starts, ends, axes, steps = _slice_params(w, node, layout.rank)
    if layout.axis not in axes:
        return {node.output[0]: layout}
    entry = axes.index(layout.axis)
    if steps[entry] != 1 or layout.repeat != 1:
        raise Unmappable("it slices the channel axis with a step other than 1")
    start, end, _ = slice(starts[entry], ends[entry]).indices(layout.channels)
    if end <= start:
        raise Unmappable("it keeps no channel")
    piece = layout.cut(start, end - start)
    w.require_kept(piece)
    w.edit("slice", i, layout, entry=entry, start=start, end=end)
    return {node.output[0]: piece}


def flatten(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    axis = _axis(graph.node_attributes(node).get("axis", 1), layout.rank)
    dims = w.dims(node.input[0])
    if dims is None:
        raise Unmappable("input shape is unknown")
    if axis != layout.axis:
        raise Unmappable(f"it flattens at axis {axis}, the channels are on axis {layout.axis}")
    inner = math.prod(dims[axis + 1 :])
    return {node.output[0]: Layout(1, 2, layout.segments, layout.repeat * inner)}


def reshape(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    """Only a flatten of the channel axis and what follows it (e.g. [N,C,H,W] -> [N,C*H*W])."""
    layout = channels_input(ins)
    source, target = w.dims(node.input[0]), w.dims(node.output[0])
    shape = w.const(node.input[1])
    if source is None or target is None:
        raise Unmappable("its shapes are unknown")
    if shape is None:
        raise Unmappable("its target shape is not constant")
    ax = layout.axis
    trailing = target[ax + 1 :]
    flat = target[:ax] == source[:ax] and len(target) > ax and target[ax] == math.prod(source[ax:])
    if not flat or any(d != 1 for d in trailing):
        raise Unmappable(f"it is not a flatten of the channel axis ({source} -> {target})")
    w.edit("reshape", i, layout, entry=ax)
    inner = math.prod(source[ax + 1 :])
    return {node.output[0]: Layout(ax, len(target), layout.segments, layout.repeat * inner)}


def squeeze(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    axes = _axes_input(w, node)
    if node.op_type == "Squeeze":
        if axes is None:
            dims = w.dims(node.input[0])
            if dims is None:
                raise Unmappable("input shape is unknown")
            axes = [k for k, d in enumerate(dims) if d == 1]
        axes = [_axis(a, layout.rank) for a in axes]
        if layout.axis in axes:
            raise Unmappable("it removes the channel axis")
        axis = layout.axis - sum(a < layout.axis for a in axes)
        return {node.output[0]: layout.moved(axis, layout.rank - len(axes))}
    rank = layout.rank + len(axes or [])
    axes = sorted(_axis(a, rank) for a in axes or [])
    kept_positions = [k for k in range(rank) if k not in axes]
    return {node.output[0]: layout.moved(kept_positions[layout.axis], rank)}


def transpose(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    perm = list(graph.node_attributes(node).get("perm", range(layout.rank)[::-1]))
    if layout.repeat != 1:
        raise Unmappable("it moves flattened channels")
    return {node.output[0]: layout.moved(perm.index(layout.axis), layout.rank)}


def resize(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    attrs = graph.node_attributes(node)
    axes = [_axis(a, layout.rank) for a in attrs.get("axes", range(layout.rank))]
    if layout.axis not in axes:
        return {node.output[0]: layout}
    entry = axes.index(layout.axis)
    scales = attrs.get("scales")  # Upsample before opset 9
    scale_input = 1 if node.op_type == "Upsample" or w.opset == 10 else 2
    if scales is None and len(node.input) > scale_input and node.input[scale_input]:
        scales = w.const(node.input[scale_input])
        if scales is None:
            raise Unmappable("its scales are not constant")
    if scales is not None and len(scales):
        if float(np.asarray(scales).reshape(-1)[entry]) != 1.0:
            raise Unmappable("it scales the channel axis")
        return {node.output[0]: layout}
    sizes = w.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if sizes is None:
        raise Unmappable("its sizes are not constant")
    if layout.repeat != 1:
        raise Unmappable("it resizes flattened channels")
    w.edit("resize", i, layout, 3, entry=entry)
    return {node.output[0]: layout}


def pad(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    attrs = graph.node_attributes(node)
    pads = attrs.get("pads") if w.opset < 11 else w.const(node.input[1])
    if pads is None:
        raise Unmappable("its pads are not constant")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = list(range(layout.rank))
    if len(node.input) > 3 and node.input[3]:
        value = w.const(node.input[3])
        if value is None:
            raise Unmappable("its axes are not constant")
        axes = [_axis(int(a), layout.rank) for a in value.reshape(-1)]
    if layout.axis in axes:
        entry = axes.index(layout.axis)
        if pads[entry] or pads[entry + len(axes)]:
            raise Unmappable("it pads the channel axis")
    return {node.output[0]: layout}


def softmax(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    default = -1 if w.opset >= 13 else 1
    axis = _axis(graph.node_attributes(node).get("axis", default), layout.rank)
    # Before opset 13 the input is coerced to 2-D at `axis`: every later axis is normalised too.
    ties = layout.axis == axis if w.opset >= 13 else layout.axis >= axis
    if ties:
        raise Unmappable("it normalises over the channel axis")
    return {node.output[0]: layout}


def reduce(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    attrs = graph.node_attributes(node)
    axes = _axes_input(w, node)
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return {node.output[0]: layout}
        raise Unmappable("it reduces over every axis")
    axes = [_axis(a, layout.rank) for a in axes]
    if layout.axis in axes:
        raise Unmappable("it reduces over the channel axis")
    if attrs.get("keepdims", 1):
        return {node.output[0]: layout}
    axis = layout.axis - sum(a < layout.axis for a in axes)
    return {node.output[0]: layout.moved(axis, layout.rank - len(axes))}


# --- small helpers ---------------------------------------------------------------------------


def _with(ins: list) -> list[int]:
    return [k for k, layout in enumerate(ins) if layout is not None]


def _axis(axis: int, rank: int) -> int:
    return int(axis) + rank if int(axis) < 0 else int(axis)


def _axes_input(w: Walker, node: onnx.NodeProto) -> list[int] | None:
    """`axes` from the attribute (older opsets) or the constant second input."""
    attrs = graph.node_attributes(node)
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) > 1 and node.input[1]:
        value = w.const(node.input[1])
        if value is None:
            raise Unmappable("its axes are not constant")
        return [int(a) for a in value.reshape(-1)]
    return None


def _split_sizes(w: Walker, node: onnx.NodeProto, channels: int, attrs: dict) -> list[int]:
    sizes = attrs.get("split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        value = w.const(node.input[1])
        if value is None:
            raise Unmappable("its split sizes are not constant")
        sizes = value.reshape(-1)
    if sizes is None:
        parts = int(attrs.get("num_outputs", len(node.output)))
        chunk = -(-channels // parts)
        sizes = [min(chunk, channels - k * chunk) for k in range(parts)]
    return [int(s) for s in sizes]


def _slice_params(w: Walker, node: onnx.NodeProto, rank: int):
    attrs = graph.node_attributes(node)
    if w.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        values = [w.const(name) if name else None for name in node.input[1:5]]
        if any(values[k] is None for k in (0, 1)) or any(
            len(node.input) > k + 1 and node.input[k + 1] and values[k] is None for k in (2, 3)
        ):
            raise Unmappable("its starts/ends/axes/steps are not constant")
        starts, ends = [int(v) for v in values[0]], [int(v) for v in values[1]]
        axes = [int(v) for v in values[2]] if len(values) > 2 and values[2] is not None else None
        steps = [int(v) for v in values[3]] if len(values) > 3 and values[3] is not None else None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, [_axis(a, rank) for a in axes], steps


RULES = {
    **{op: unary for op in UNARY},
    **{op: pool for op in POOLS},
    **{op: elementwise for op in ELEMENTWISE},
    **{op: reduce for op in REDUCE},
    "BatchNormalization": normalization,
    "InstanceNormalization": normalization,
    "LayerNormalization": layer_norm,
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Flatten": flatten,
    "Reshape": reshape,
    "Squeeze": squeeze,
    "Unsqueeze": squeeze,
    "Transpose": transpose,
    "Resize": resize,
    "Upsample": resize,
    "Pad": pad,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "Hardmax": softmax,
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": matmul,
}
