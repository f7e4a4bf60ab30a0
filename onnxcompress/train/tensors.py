"""The tensors of an ONNX graph that TorchGraph holds, seen without torch: which of them are
weights it may train (and write back), which of those train by default, and the node order.

A weight is a float tensor of at least one element stored where `write_back` can put it
again: an initializer (IR 3 files list these as graph inputs too) or the `value` of a
top-level `Constant` node (paddle2onnx and spox exports keep their weights there)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress.errors import CompressError
from onnxcompress.graph import constant_tensors

# The inputs of each op that hold a layer's learned values: weights, biases, norm scales.
# Either side of MatMul and Gemm: the passes write left-hand weights too (b @ x).
# BatchNormalization's mean and variance (inputs 3, 4) are statistics, not trained.
LEARNED_INPUTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "PRelu": (1,),
}
# Ops whose output a constant Add or Mul turns into a biased or scaled layer output.
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
AFFINE_OPS = ("Add", "Mul")

Trainable = Iterable[str] | Callable[[str], bool] | None


def stored_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float tensors of one element or more held in initializers or `Constant` values."""
    found = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    found.setdefault(node.output[0], numpy_helper.to_array(attr.t))
    return {name: a for name, a in found.items() if a.dtype.kind == "f" and a.size >= 1}


def default_trainable(model: onnx.ModelProto) -> set[str]:
    """The weights a fine-tune trains unless told otherwise: the weights and biases of
    Conv/ConvTranspose/Gemm/MatMul, the scales and biases of the normalizations and PRelu's
    slope, and a constant added to or multiplied with a layer's output (a bias or a channel
    scale, as in MatMul → Add). A constant in any other place is not: an activation's
    constants (hard-swish's +3, GELU's 0.5), anchor boxes, shapes and indices."""
    weights = stored_weights(model)
    chosen: set[str] = set()
    layer_outputs: set[str] = set()
    for node in model.graph.node:
        for index in LEARNED_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] in weights:
                chosen.add(node.input[index])
        if node.op_type in LINEAR_OPS:
            layer_outputs.update(node.output)
        elif node.op_type in AFFINE_OPS and len(node.input) == 2:
            scale = _affine_constant(node, weights, layer_outputs)
            if scale is not None:
                chosen.add(scale)
                layer_outputs.update(node.output)
    return chosen


def _affine_constant(
    node: onnx.NodeProto, weights: dict[str, np.ndarray], layer_outputs: set[str]
) -> str | None:
    """The weight of an Add/Mul whose other operand is a layer's output, if it has one."""
    a, b = node.input
    if a in layer_outputs and b in weights:
        return b
    if b in layer_outputs and a in weights:
        return a
    return None


def trainable_names(model: onnx.ModelProto, trainable: Trainable) -> set[str]:
    """The weights to train: the default rule (None), a predicate on the tensor name, or a
    collection of names (each must be a weight of the model)."""
    weights = stored_weights(model)
    if trainable is None:
        return default_trainable(model)
    if callable(trainable):
        return {name for name in weights if trainable(name)}
    names = set(trainable)
    unknown = sorted(names - set(weights))
    if unknown:
        raise CompressError(
            f"not a float weight of the model (initializer or Constant): {', '.join(unknown)}"
        )
    return names


def topological_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The non-Constant nodes in an order where each runs after its inputs' producers
    (the file's order where that already holds)."""
    graph = model.graph
    ready = {""} | {i.name for i in graph.input} | set(constant_tensors(model))
    pending = [node for node in graph.node if node.op_type != "Constant"]
    order: list[onnx.NodeProto] = []
    while pending:
        left = []
        for node in pending:
            if all(name in ready for name in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            missing = sorted(n for n in left[0].input if n not in ready)
            raise CompressError(
                f"node {left[0].name or left[0].op_type} reads {', '.join(missing)}, "
                "which nothing in the graph produces (or the graph has a cycle)"
            )
        pending = left
    return order
