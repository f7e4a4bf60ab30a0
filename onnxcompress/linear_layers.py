"""`Gemm` and `MatMul` nodes with one constant 2-D operand, read off the graph as linear layers
(the weight as a plain matrix, alpha and transposes applied), and the surgery that swaps such a
layer for two nodes through a narrow width r: W ≈ A·B."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress import graph
from onnxcompress.analyse import ModelAnalysis
from onnxcompress.layer_refit import RefitSite
from onnxcompress.layers import Namer, tensor_shapes
from onnxcompress.passkit import NodeRecord


@dataclass
class BiasAdd:
    """The `Add` of a constant bias that alone consumes a right-side MatMul's output."""

    node: str  # the Add node's name
    output: str  # its output tensor (the biased layer output)
    bias: str  # the bias initializer: N elements on the last axis, read by this Add only


@dataclass
class LinearLayer:
    """A Gemm or MatMul whose one constant operand is a 2-D float matrix.

    side "right": y = x @ W with `weight` W (K × N), Gemm's alpha and transB applied.
    side "left": y = W @ x with `weight` W (M × K), Gemm's alpha and transA applied.
    """

    node: onnx.NodeProto
    name: str
    op: str  # "Gemm" | "MatMul"
    weight: np.ndarray
    bias: np.ndarray | None  # Gemm: beta·C as an [N] vector when C is constant and per-column
    side: str  # "right" | "left"
    activation: str  # the non-constant input tensor
    input_shape: list[int]  # the activation's shape
    output_shape: list[int]
    macs: int
    trans: int = 0  # Gemm: transA (right side) or transB (left side) on the activation
    c: np.ndarray | None = None  # Gemm: beta·C as stored (any broadcastable shape), if any
    bias_add: BiasAdd | None = None  # right-side MatMul only

    @property
    def in_features(self) -> int:
        return self.weight.shape[0] if self.side == "right" else self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.side == "right" else self.weight.shape[0]

    @property
    def positions(self) -> int:
        """Output rows (right side) or columns (left side) the weight is applied at."""
        return math.prod(self.output_shape) // self.out_features


def linear_layers(
    model: onnx.ModelProto, analysis: ModelAnalysis
) -> tuple[list[LinearLayer], list[NodeRecord]]:
    """Every Gemm/MatMul with one constant 2-D float operand; a skip record for every other."""
    constants = graph.LazyConstants(model)  # only the layers' weights are read
    initializers = {init.name for init in model.graph.initializer}
    # An initializer also listed as a graph input may be fed by the caller: not a fixed bias.
    listed = {inp.name for inp in model.graph.input}
    shapes = tensor_shapes(model, analysis)
    users = graph.consumers(model)
    outputs = {out.name for out in model.graph.output}
    layers, skipped = [], []
    for node, stats in zip(model.graph.node, analysis.nodes, strict=True):
        if node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        reason = _skip_reason(node, constants, shapes)
        if reason:
            skipped.append(
                NodeRecord(stats.name, node.op_type, "skipped", reason, macs_before=stats.macs)
            )
            continue
        layer = _linear_layer(node, stats.name, stats.macs, constants, shapes)
        if layer.op == "MatMul" and layer.side == "right" and node.output[0] not in outputs:
            layer.bias_add = _bias_add(layer, constants, initializers - listed, users, outputs)
        layers.append(layer)
    return layers, skipped


def conv_and_linear_layers(model: onnx.ModelProto, analysis: ModelAnalysis) -> tuple[list, list]:
    """Conv layers and Gemm/MatMul layers together, in graph order, with their skip records."""
    from onnxcompress.layers import conv_layers

    convs, conv_skips = conv_layers(model, analysis)
    linears, linear_skips = linear_layers(model, analysis)
    position = {stats.name: i for i, stats in enumerate(analysis.nodes)}
    layers = sorted([*convs, *linears], key=lambda layer: position[layer.name])
    skips = sorted([*conv_skips, *linear_skips], key=lambda record: position[record.node])
    return layers, skips


def _skip_reason(node, constants, shapes) -> str:
    operands = list(node.input[:2])
    constant = [name in constants for name in operands]
    if not any(constant):
        return "no constant operand: both inputs are activations"
    if all(constant):
        return "both operands are constant (constant folding applies, not factorization)"
    weight = constants[operands[constant.index(True)]]
    if not np.issubdtype(weight.dtype, np.floating):
        return f"weight dtype {weight.dtype} is not floating point"
    if weight.ndim != 2:
        return f"constant operand is {weight.ndim}-D: only 2-D weights are factorized"
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        if node.input[2] not in constants:
            return "C is not constant"
    activation = operands[constant.index(False)]
    if activation not in shapes or node.output[0] not in shapes:
        return "input or output shape unknown"
    return ""


def _linear_layer(node, name, macs, constants, shapes) -> LinearLayer:
    side = "right" if node.input[1] in constants else "left"
    activation = node.input[0] if side == "right" else node.input[1]
    weight = constants[node.input[1] if side == "right" else node.input[0]]
    out_shape = shapes[node.output[0]]
    layer = LinearLayer(
        node=node,
        name=name,
        op=node.op_type,
        weight=weight,
        bias=None,
        side=side,
        activation=activation,
        input_shape=shapes[activation],
        output_shape=out_shape,
        macs=macs,
    )
    if node.op_type == "Gemm":
        _read_gemm(layer, graph.node_attributes(node), constants)
    return layer


def _read_gemm(layer: LinearLayer, attrs: dict, constants) -> None:
    """Fold alpha and the weight's transpose into `weight`, beta into `c` and `bias`."""
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    weight = layer.weight.astype(np.float64)
    if layer.side == "right":
        weight, layer.trans = (weight.T if trans_b else weight), trans_a
    else:
        weight, layer.trans = (weight.T if trans_a else weight), trans_b
    dtype = layer.weight.dtype
    layer.weight = (alpha * weight).astype(dtype)
    node = layer.node
    if len(node.input) < 3 or not node.input[2]:
        return
    c = beta * constants[node.input[2]].astype(np.float64)
    layer.c = c.astype(dtype)
    # C broadcasts against the (M, N) output; without a row axis it is one bias per column.
    if layer.side == "right" and (c.ndim < 2 or c.shape[0] == 1):
        layer.bias = np.broadcast_to(c.reshape(-1), (layer.out_features,)).astype(dtype)


def _bias_add(layer, constants, initializers, users, outputs) -> BiasAdd | None:
    """The Add of an [N] bias initializer that is the only reader of the MatMul's output."""
    readers = users.get(layer.node.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add" or readers[0].domain not in ("", "ai.onnx"):
        return None
    add = readers[0]
    others = [name for name in add.input if name != layer.node.output[0]]
    if len(others) != 1 or others[0] not in initializers or others[0] in outputs:
        return None
    bias = constants[others[0]]
    n = layer.out_features
    per_column = bias.ndim <= len(layer.output_shape) and bias.shape[-1:] == (n,)
    if not per_column or bias.size != n or bias.dtype != layer.weight.dtype:
        return None
    if len(users.get(others[0], [])) != 1:
        return None  # shared bias: a refit must not change another node's input
    return BiasAdd(add.name, add.output[0], others[0])


def first_gemm_c(layer: LinearLayer) -> bool:
    """Whether a rewrite's Gemms that have no C of their own carry a zero one: when the
    layer's own Gemm has a C (its model may be older than opset 11, where Gemm requires C)."""
    node = layer.node
    return layer.op == "Gemm" and len(node.input) > 2 and bool(node.input[2])


def zero_c(layer: LinearLayer, constant, width: int) -> list[str]:
    """The extra input of a rewrite's C-less Gemm: `[constant("zero_c", zeros(width))]` when
    `first_gemm_c(layer)`, else []. `constant(label, value)` makes the initializer. No MACs;
    `width` parameters: the Gemm's output width, not a broadcast scalar, because onnxruntime's
    per-channel int8 quantizer fails on a one-element bias."""
    return [constant("zero_c", np.zeros(width))] if first_gemm_c(layer) else []


def low_rank_nodes(
    layer: LinearLayer,
    a: np.ndarray,
    b: np.ndarray,
    namer: Namer,
    tag: str,
    bias_add: bool = False,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], RefitSite | None]:
    """Two nodes computing the layer with W ≈ a @ b, and the refit site of the last one.

    Right side: x @ a (width r) then @ b. Left side: b @ x (r rows) then a @ that. A Gemm
    keeps its transpose of the activation on the first node; the second carries beta·C (or a
    zero [N] bias, which costs no MACs, so a refit can set it). A right-side MatMul refits
    through the constant-bias `Add` that follows it, when `layer.bias_add` found one; with
    `bias_add` it ends in an Add of a zero bias instead (N MACs per row); otherwise it has no
    refit site. Left-side layers have none: their features are not on the last axis.
    """
    dtype = layer.weight.dtype
    inits: list[onnx.TensorProto] = []

    def constant(label: str, value: np.ndarray) -> str:
        name = namer(f"{layer.name}.{tag}_{label}")
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(label: str, inputs: list[str], out: str | None = None, **attrs):
        return helper.make_node(
            layer.op,
            inputs,
            [out or namer(f"{layer.name}.{tag}_{label}.out")],
            name=namer(f"{layer.name}.{tag}_{label}"),
            **attrs,
        )

    output, site = layer.node.output[0], None
    if layer.side == "left":  # b @ x: its width is x's, unknown here; a broadcast zero
        attrs = {"transB": layer.trans} if layer.op == "Gemm" and layer.trans else {}
        first_c = zero_c(layer, constant, 1)  # opset < 11 Gemm needs a C
        first = node("first", [constant("b", b), layer.activation, *first_c], **attrs)
        inputs = [constant("a", a), first.output[0]]
        if layer.c is not None:
            inputs.append(constant("c", layer.c))
        return [first, node("second", inputs, output)], inits, None
    if layer.op == "Gemm":
        attrs = {"transA": layer.trans} if layer.trans else {}
        first_c = zero_c(layer, constant, a.shape[1])
        first = node("first", [layer.activation, constant("a", a), *first_c], **attrs)
        b_name = constant("b", b)
        if layer.bias is not None or layer.c is None:
            bias = layer.bias if layer.bias is not None else np.zeros(layer.out_features)
            bias_name = constant("bias", bias)
            site = RefitSite(first.output[0], output, b_name, bias_name, "matmul")
        else:
            bias_name = constant("c", layer.c)  # per-row C: kept as it is, no refit site
        second = node("second", [first.output[0], b_name, bias_name], output)
        return [first, second], inits, site
    first = node("first", [layer.activation, constant("a", a)])
    b_name = constant("b", b)
    if layer.bias_add is not None:
        second = node("second", [first.output[0], b_name], output)
        folded = layer.bias_add
        site = RefitSite(first.output[0], folded.output, b_name, folded.bias, "matmul")
        return [first, second], inits, site
    if not bias_add:
        return [first, node("second", [first.output[0], b_name], output)], inits, None
    second = node("second", [first.output[0], b_name])
    bias_name = constant("bias", np.zeros(layer.out_features))
    add = helper.make_node(
        "Add", [second.output[0], bias_name], [output], name=namer(f"{layer.name}.{tag}_bias")
    )
    site = RefitSite(first.output[0], output, b_name, bias_name, "matmul")
    return [first, second, add], inits, site
