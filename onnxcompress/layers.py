"""The layers a factorization or pruning pass can rewrite, read off the graph with their
constant weights and resolved geometry, and the surgery that swaps a node for a subgraph."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress import graph
from onnxcompress.analyse import ModelAnalysis
from onnxcompress.passkit import NodeRecord


@dataclass
class ConvLayer:
    """A 2-D `Conv` whose weight (and bias) are constants, with explicit padding."""

    node: onnx.NodeProto
    name: str
    weight: np.ndarray  # W[n, c/group, kh, kw]
    bias: np.ndarray | None
    group: int
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right (auto_pad resolved)
    input_shape: list[int]  # N, C, H, W
    output_shape: list[int]
    macs: int

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.group

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]

    @property
    def output_pixels(self) -> int:
        """Output positions per sample (H_out · W_out); a factor costs MACs/pixel × this."""
        return int(np.prod(self.output_shape[2:]))

    @property
    def batch(self) -> int:
        return self.output_shape[0]


def tensor_shapes(model: onnx.ModelProto, analysis: ModelAnalysis) -> dict[str, list[int]]:
    """Concrete shape of every tensor the analysis knows (inputs and node outputs)."""
    shapes = {name: list(shape) for name, shape in analysis.input_shapes.items()}
    for node, stats in zip(model.graph.node, analysis.nodes, strict=True):
        for out, shape in zip(node.output, stats.output_shapes, strict=False):
            if shape:
                shapes[out] = list(shape)
    return shapes


def conv_layers(
    model: onnx.ModelProto, analysis: ModelAnalysis
) -> tuple[list[ConvLayer], list[NodeRecord]]:
    """Every Conv with constant weights and known shapes; a skip record for every other."""
    constants = graph.LazyConstants(model)  # only the layers' weights are read
    shapes = tensor_shapes(model, analysis)
    layers, skipped = [], []
    for node, stats in zip(model.graph.node, analysis.nodes, strict=True):
        if node.op_type != "Conv":
            continue
        reason = _conv_skip_reason(node, constants, shapes)
        if reason:
            skipped.append(
                NodeRecord(stats.name, "Conv", "skipped", reason, macs_before=stats.macs)
            )
            continue
        layers.append(_conv_layer(node, stats.name, stats.macs, constants, shapes))
    return layers, skipped


def _conv_skip_reason(node, constants, shapes) -> str:
    if node.input[1] not in constants:
        return "weight is not constant"
    if len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
        return "bias is not constant"
    rank = constants[node.input[1]].ndim - 2
    if rank != 2:
        return f"{rank}-D convolution: only 2-D convolutions are factorized"
    if not np.issubdtype(constants[node.input[1]].dtype, np.floating):
        return f"weight dtype {constants[node.input[1]].dtype} is not floating point"
    if node.input[0] not in shapes or node.output[0] not in shapes:
        return "input or output shape unknown"
    return ""


def _conv_layer(node, name, macs, constants, shapes) -> ConvLayer:
    attrs = graph.node_attributes(node)
    weight = constants[node.input[1]]
    bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    kernel = weight.shape[2:]
    strides = tuple(attrs.get("strides", [1, 1]))
    dilations = tuple(attrs.get("dilations", [1, 1]))
    in_shape, out_shape = shapes[node.input[0]], shapes[node.output[0]]
    pads = explicit_pads(attrs, in_shape[2:], out_shape[2:], kernel, strides, dilations)
    return ConvLayer(
        node=node,
        name=name,
        weight=weight,
        bias=bias,
        group=int(attrs.get("group", 1)),
        strides=strides,
        dilations=dilations,
        pads=pads,
        input_shape=in_shape,
        output_shape=out_shape,
        macs=macs,
    )


def explicit_pads(attrs, in_hw, out_hw, kernel, strides, dilations) -> tuple[int, int, int, int]:
    """Pads (top, left, bottom, right) equivalent to the node's `pads` / `auto_pad`."""
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        return tuple(int(p) for p in pads)  # type: ignore[return-value]
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for size, out, k, s, d in zip(in_hw, out_hw, kernel, strides, dilations, strict=True):
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        # SAME_UPPER puts the extra pad at the end, SAME_LOWER at the beginning.
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


class Namer:
    """Fresh tensor and node names that do not clash with anything in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used = {init.name for init in model.graph.initializer}
        for node in model.graph.node:
            self.used.update(node.input)
            self.used.update(node.output)
            self.used.add(node.name)
        self.used.update(vi.name for vi in model.graph.input)

    def __call__(self, base: str) -> str:
        for suffix in itertools.chain([""], (f"_{i}" for i in itertools.count(1))):
            name = base + suffix
            if name not in self.used:
                self.used.add(name)
                return name
        raise AssertionError("unreachable")


def conv_node(
    namer: Namer,
    name: str,
    x: str,
    weight: np.ndarray,
    out: str | None = None,
    bias: np.ndarray | None = None,
    **attrs,
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """One Conv node with fresh initializers for its weight (and bias)."""
    w_name = namer(f"{name}.weight")
    inits = [numpy_helper.from_array(weight, w_name)]
    inputs = [x, w_name]
    if bias is not None:
        b_name = namer(f"{name}.bias")
        inits.append(numpy_helper.from_array(bias, b_name))
        inputs.append(b_name)
    node = helper.make_node(
        "Conv",
        inputs,
        [out or namer(f"{name}.out")],
        name=namer(name),
        **{k: v for k, v in attrs.items() if v is not None},
    )
    return node, inits


def replace_node(
    model: onnx.ModelProto,
    node_name: str,
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
) -> None:
    """Swap the node called `node_name` for `nodes` (in order, same final output) in place.

    The replacement goes where the node stood, so the graph stays topologically sorted.
    """
    position = next(i for i, node in enumerate(model.graph.node) if node.name == node_name)
    del model.graph.node[position]
    for offset, new_node in enumerate(nodes):
        model.graph.node.insert(position + offset, new_node)
    model.graph.initializer.extend(initializers)
    if model.ir_version < graph.MIN_IR_WITHOUT_INITIALIZER_INPUTS:
        # IR 3 requires every initializer to be listed as a graph input too.
        model.graph.input.extend(
            helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            for init in initializers
        )
    # Intermediate shapes recorded before the rewrite may now be stale.
    outputs = {out for node in nodes for out in node.output}
    keep = [vi for vi in model.graph.value_info if vi.name not in outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def named(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself when its nodes all have unique names (a copy costs its size), else
    `named_copy`: for callers that only read it."""
    names = [node.name for node in model.graph.node]
    return model if all(names) and len(set(names)) == len(names) else named_copy(model)


def named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every node has a unique name (`<op>_<index>` where it had none),
    matching the names `analyse` reports, so records and surgery can refer to nodes by name."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    seen: set[str] = set()
    for index, node in enumerate(copy.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return copy


def spatial_conv_node(
    namer: Namer, layer: ConvLayer, name: str, x: str, weight: np.ndarray, group: int = 1
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A kh×kw Conv with the layer's own kernel, stride, dilations and resolved pads."""
    return conv_node(
        namer,
        name,
        x,
        weight,
        group=group,
        kernel_shape=list(layer.kernel),
        strides=list(layer.strides),
        dilations=list(layer.dilations),
        pads=list(layer.pads),
    )


def vertical_conv_node(
    namer: Namer, layer: ConvLayer, name: str, x: str, weight: np.ndarray, group: int = 1
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The kh×1 half of a separable form: the layer's vertical stride, dilation and pads."""
    (sh, _), (dh, _) = layer.strides, layer.dilations
    top, _, bottom, _ = layer.pads
    return conv_node(
        namer,
        name,
        x,
        weight,
        group=group,
        kernel_shape=[layer.kernel[0], 1],
        strides=[sh, 1],
        dilations=[dh, 1],
        pads=[top, 0, bottom, 0],
    )


def horizontal_conv_node(
    namer: Namer,
    layer: ConvLayer,
    name: str,
    x: str,
    weight: np.ndarray,
    group: int = 1,
    out: str | None = None,
    bias: np.ndarray | None = None,
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The 1×kw half of a separable form: the layer's horizontal stride, dilation and pads."""
    (_, sw), (_, dw) = layer.strides, layer.dilations
    _, left, _, right = layer.pads
    return conv_node(
        namer,
        name,
        x,
        weight,
        out=out,
        bias=bias,
        group=group,
        kernel_shape=[1, layer.kernel[1]],
        strides=[1, sw],
        dilations=[1, dw],
        pads=[0, left, 0, right],
    )


def dense_spatial_reason(layer: ConvLayer, pass_name: str) -> str:
    """Why a pass that factorizes dense k×k convs cannot take this layer ("" if it can)."""
    if layer.group != 1:
        kind = "depthwise" if layer.group == layer.in_channels else "grouped"
        return f"{kind} conv (group={layer.group}): {pass_name} applies to dense convs"
    if layer.kernel == (1, 1):
        return f"1×1 conv: {pass_name} needs a spatial kernel (svd applies)"
    return ""
