"""The weights pruning passes act on: the constant weight of each Conv / ConvTranspose / Gemm /
MatMul (initializer, `Constant` node or graph-input initializer), found once for `prune` and
`rdprune`, and written back where it came from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress import graph
from onnxcompress.passkit import NodeRecord

PRUNABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOATS = (np.float16, np.float32, np.float64)


@dataclass
class PrunableLayer:
    node: onnx.NodeProto
    weight: str  # tensor name (initializer or Constant output)
    axis: int  # the weight axis of input features (for N:M patterns)


def label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def prunable_layers(
    model: onnx.ModelProto, constants: dict[str, np.ndarray], ops: tuple[str, ...] = PRUNABLE
) -> tuple[list[PrunableLayer], list[NodeRecord]]:
    """Layers of the kinds in `ops` whose weight can be pruned, in graph order, and a skip
    record, with the reason, for every other layer of those kinds."""
    layers, records = [], []
    users = graph.consumers(model)
    for node in model.graph.node:
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            continue
        slot, axis, why = weight_slot(node, constants)
        name = node.input[slot] if slot is not None else ""
        if name:
            others = [u for u in users.get(name, []) if u.op_type not in PRUNABLE]
            value = constants[name]
            if others:
                why = f"weight {name} is also used by {others[0].op_type} {label(others[0])}"
            elif value.dtype not in FLOATS or value.size == 0:
                why = f"weight {name} is an empty or {value.dtype} tensor"
            elif not np.all(np.isfinite(value)):
                why = f"weight {name} has non-finite values"
        if why:
            records.append(NodeRecord(label(node), node.op_type, "skipped", why))
        else:
            layers.append(PrunableLayer(node, name, axis))
    return layers, records


def weight_slot(node: onnx.NodeProto, constants: dict) -> tuple[int | None, int, str]:
    """(input index of the constant weight, its input-feature axis, reason if none)."""
    const = [i < len(node.input) and node.input[i] in constants for i in (0, 1)]
    if node.op_type in ("Conv", "ConvTranspose"):
        if not const[1]:
            return None, 0, "weight is not a constant tensor"
        return 1, (1 if node.op_type == "Conv" else 0), ""
    if const[0] and const[1]:
        return None, 0, "both operands are constant (nothing to prune at run time)"
    if not (const[0] or const[1]):
        return None, 0, "weight is not a constant tensor"
    attrs = graph.node_attributes(node)
    if node.op_type == "Gemm":  # input features: K of A[M,K] / B[K,N] (after transposes)
        if const[1]:
            return 1, (1 if attrs.get("transB", 0) else 0), ""
        return 0, (0 if attrs.get("transA", 0) else 1), ""
    return (1, -2, "") if const[1] else (0, -1, "")  # MatMul: x @ W or W @ x


def write_weights(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """Store new values, in place, where the weights came from: initializer or Constant."""
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in values:
            tensor = numpy_helper.from_array(values[node.output[0]], node.output[0])
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", tensor))
