"""Where a refit consumer's output is judged: right at its output, or — when its only user is an
elementwise residual Add — at that Add, where the layer can make up for error arriving by the
other path, and through a Relu that alone reads the result, where negative values all look the
same (docs/methods.md, channel refit)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxcompress import graph


@dataclass(frozen=True)
class Judged:
    """The tensor to match in the original model, the pruned model's tensor added to the
    consumer's output on the way there ("" if none), and whether a Relu follows."""

    target: str
    offset: str = ""
    rectified: bool = False


def judged_at(
    model: onnx.ModelProto, node: onnx.NodeProto, constants: dict, shapes: dict
) -> Judged:
    """For a Conv/Gemm consumer: its residual Add (when the Add's other input is a computed
    tensor of the same shape) and a following Relu; otherwise its own output."""
    users = graph.consumers(model)
    output = node.output[0]
    target, offset = output, ""
    add = _only_user(users, output, "Add")
    if add is not None and len(add.input) == 2:
        other = add.input[1] if add.input[0] == output else add.input[0]
        shape = _shape(shapes, output)
        same = shape is not None and _shape(shapes, other) == shape  # no broadcasting
        if other != output and other not in constants and same:
            target, offset = add.output[0], other
    relu = _only_user(users, target, "Relu")
    if relu is None and offset:  # an Add whose result is not rectified: judge at the Add
        return Judged(target, offset)
    return Judged(target, offset, rectified=relu is not None)


def tensor_shapes(model: onnx.ModelProto, input_shapes: dict) -> dict[str, list]:
    """Inferred dims of every tensor with the calibration input shapes pinned."""
    inferred = graph.infer_shapes(graph.with_input_shapes(model, input_shapes))
    return {name: graph.dim_values(vi) for name, vi in graph.value_infos(inferred).items()}


def _only_user(users: dict, tensor: str, op_type: str) -> onnx.NodeProto | None:
    found = users.get(tensor, [])
    if len(found) == 1 and found[0].op_type == op_type:
        return found[0]
    return None


def _shape(shapes: dict, name: str) -> tuple | None:
    dims = shapes.get(name)
    if not dims or any(not isinstance(d, int) for d in dims):
        return None
    return tuple(dims)
