"""Channel rules for the ops where groups start and end: Conv, ConvTranspose, Gemm and MatMul
with constant weights consume the incoming channels (their input weights get sliced) and
produce a new group from their output channels (see `channel_rules` for the other ops)."""

from __future__ import annotations

import onnx

from onnxcompress import graph
from onnxcompress.channels.groups import (
    Layout,
    Unmappable,
    Walker,
    channels_input,
    require_channels_on_axis_1,
)


def conv(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    weight, bias_ok = w.const(node.input[1]), _bias_constant(w, node, 2)
    if weight is None:
        if layout is not None:
            raise Unmappable("its weight is not constant")
        return {}
    groups = int(graph.node_attributes(node).get("group", 1))
    c_out, c_in = weight.shape[0], weight.shape[1] * groups
    if layout is not None:
        require_channels_on_axis_1(layout)
    rank = weight.ndim
    if groups > 1 and groups == c_in == c_out:  # depthwise: output channel c reads input c only
        if layout is None:
            return {}
        w.edit("depthwise", i, layout)
        return {node.output[0]: layout}
    if layout is not None:
        if groups > 1:
            w.require_blocks(layout, groups, f"grouped Conv (group={groups})")
        w.edit("consumer", i, layout, groups=groups)
    if not bias_ok:
        return {}
    out = w.new_space(i, c_out, blocks=groups).moved(1, rank)
    w.edit("producer", i, out)
    return {node.output[0]: out}


def conv_transpose(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    weight = w.const(node.input[1])
    groups = int(graph.node_attributes(node).get("group", 1))
    if weight is None or groups != 1:
        if layout is not None:
            raise Unmappable("its weight is not constant" if weight is None else "it is grouped")
        return {}
    if layout is not None:
        require_channels_on_axis_1(layout)
        w.edit("consumer", i, layout)
    if not _bias_constant(w, node, 2):
        return {}
    out = w.new_space(i, weight.shape[1]).moved(1, weight.ndim)
    w.edit("producer", i, out)
    return {node.output[0]: out}


def gemm(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    attrs = graph.node_attributes(node)
    weight = w.const(node.input[1])
    if weight is None:
        if layout is not None:
            raise Unmappable("its weight B is not constant")
        return {}
    if layout is not None:
        if layout.axis != (0 if attrs.get("transA", 0) else 1):
            raise Unmappable("channels are not on its K axis")
        w.edit("consumer", i, layout)
    if not _bias_constant(w, node, 2):
        return {}
    n = weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
    out = w.new_space(i, n).moved(1, 2)
    w.edit("producer", i, out)
    return {node.output[0]: out}


def matmul(w: Walker, i: int, node: onnx.NodeProto, ins: list) -> dict[str, Layout]:
    layout = channels_input(ins)
    weight = w.const(node.input[1])
    if weight is None or weight.ndim != 2:
        if layout is not None:
            raise Unmappable("its right-hand side is not a constant matrix")
        return {}
    if layout is not None:
        if layout.axis != layout.rank - 1:
            raise Unmappable("it does not contract the channel axis")
        w.edit("consumer", i, layout)
    dims = w.dims(node.output[0])
    rank = len(dims) if dims is not None else (layout.rank if layout is not None else None)
    if rank is None or rank < 2:
        return {}
    out = w.new_space(i, weight.shape[1]).moved(rank - 1, rank)
    w.edit("producer", i, out)
    return {node.output[0]: out}


def _bias_constant(w: Walker, node: onnx.NodeProto, index: int) -> bool:
    return (
        len(node.input) <= index or not node.input[index] or w.const(node.input[index]) is not None
    )
