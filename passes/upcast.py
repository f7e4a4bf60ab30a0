"""`upcast`: run a float16 model in float32. onnxruntime's CPU provider has few float16
kernels and runs a float16 file through Casts it inserts, and its int8 quantizer then works
on float16: the upcast alone is no faster, but int8 of it runs far faster than int8 of the
file (see docs/decisions.md#autooptionsupcast). The factorization passes want float32 weights
too.

Every float16 weight, Constant and intermediate becomes float32 (the weights' values are
exactly representable, so the float32 model computes the float16 weights' maths without
float16 rounding in between). With `io=keep` (default) the graph's inputs and outputs keep
their types through one Cast each at the boundary: the model stays a drop-in replacement
for the file given. `io=float32` makes them float32 too."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import graph
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext, PassResult, option
from onnxcompress.registry import register

HALF, SINGLE = TensorProto.FLOAT16, TensorProto.FLOAT
# Node attributes that name an element type the node produces (Cast's `to`, the `dtype` of
# EyeLike, RandomNormal and the like).
TYPE_ATTRIBUTES = ("to", "dtype")


@dataclass(frozen=True)
class UpcastOptions:
    io: str = option(
        "keep",
        "keep: graph inputs and outputs keep float16 (a Cast at each); float32: they change too",
    )

    def __post_init__(self) -> None:
        if self.io not in ("keep", "float32"):
            raise ValueError(f"io must be keep or float32, got {self.io!r}")


@register("upcast", UpcastOptions, "float16 model → float32 compute (inputs/outputs kept)")
def upcast(model: onnx.ModelProto, options: UpcastOptions, context: PassContext) -> PassResult:
    if _subgraphs_in_float16(model.graph):
        raise CompressError("upcast: float16 inside If/Loop/Scan bodies is not handled")
    if not computes_in_float16(model):
        raise CompressError("upcast: the model computes nothing in float16: nothing to upcast")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    # Casts to float16 that make a graph output already are the boundary `io=keep` wants.
    boundary = _output_casts(result.graph) if options.io == "keep" else set()
    counts = _single_precision(result.graph, boundary)
    if options.io == "keep":
        counts["boundary casts"] = _cast_at_boundary(result.graph, boundary)
    else:
        counts["graph inputs/outputs"] = _to_single([*result.graph.input, *result.graph.output])
    # Intermediates keep their recorded types, made float32, rather than being inferred anew:
    # an old opset's inferred types can clash with what the quantizer's opset upgrade expects
    # (SqueezeNet's opset-7 Dropout masks).
    _to_single(list(result.graph.value_info))
    summary = {"upcast": {"to": "float32", "io": options.io, **counts}, "notes": _note(counts)}
    return PassResult(result, True, [], summary)


def _note(counts: dict[str, int]) -> str:
    changed = (
        f"float16 → float32: {counts['weights']} weights, {counts['constants']} Constants, "
        f"{counts['type attributes']} Cast/dtype attributes"
    )
    if "boundary casts" in counts:
        return f"{changed}; inputs and outputs kept float16 ({counts['boundary casts']} Casts)"
    return f"{changed}; {counts['graph inputs/outputs']} inputs/outputs now float32"


def computes_in_float16(model: onnx.ModelProto) -> bool:
    """Whether the main graph has a float16 weight or Constant, or makes a float16 tensor
    other than a graph output (what `upcast` changes; its own boundary Casts are not)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    inner = [node for node in g.node if not set(node.output) <= outputs]
    return any(t.data_type == HALF for t in g.initializer) or any(map(_node_has_half, inner))


def _output_casts(g: onnx.GraphProto) -> set[str]:
    """The graph outputs made by a Cast to float16."""
    outputs = {o.name for o in g.output}
    return {
        node.output[0]
        for node in g.node
        if node.op_type == "Cast" and node.output[0] in outputs and _node_has_half(node)
    }


def _single_precision(g: onnx.GraphProto, boundary: set[str]) -> dict[str, int]:
    """Make every float16 weight, Constant and produced type of `g` float32, but for the Casts
    making the `boundary` outputs; counts by kind."""
    counts = {"weights": 0, "constants": 0, "type attributes": 0}
    for init in g.initializer:
        if init.data_type == HALF:
            init.CopyFrom(_as_single(init))
            counts["weights"] += 1
    weights = {init.name for init in g.initializer}
    _to_single([inp for inp in g.input if inp.name in weights])  # weights listed as inputs
    for node in g.node:
        tensor = _attribute_tensor(node)
        if tensor is not None and tensor.data_type == HALF:
            tensor.CopyFrom(_as_single(tensor))
            counts["constants"] += 1
        if node.op_type == "Cast" and node.output[0] in boundary:
            continue
        for attr in _half_types(node):
            attr.i = SINGLE
            counts["type attributes"] += 1
    return counts


def _as_single(tensor: TensorProto) -> TensorProto:
    value = numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(value, tensor.name)


def _attribute_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a Constant or ConstantOfShape holds in its `value` attribute."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == attr.TENSOR:
            return attr.t
    return None


def _cast_at_boundary(g: onnx.GraphProto, boundary: set[str]) -> int:
    """Keep float16 graph inputs and outputs: a Cast to float32 after each such input, one to
    float16 before each such output (the producer then writes a float32 tensor) unless a
    Cast to float16 makes it (`boundary`). Returns the Casts added."""
    initializers = {init.name for init in g.initializer}
    inputs = [i for i in g.input if _is_half(i) and i.name not in initializers]
    # An input that is also an output passes straight through, in float16, untouched.
    passing = {i.name for i in inputs} | boundary
    outputs = [o for o in g.output if _is_half(o) and o.name not in passing]
    taken = {name for node in g.node for name in (*node.input, *node.output)}
    taken |= {i.name for i in g.input} | initializers
    head, tail = [], []
    for inp in inputs:
        inner = graph.fresh_name(f"{inp.name}_float32", taken)
        _rename_reads(g, inp.name, inner)
        head.append(helper.make_node("Cast", [inp.name], [inner], to=SINGLE, name=inner))
    for out in outputs:
        inner = graph.fresh_name(f"{out.name}_float32", taken)
        _rename_reads(g, out.name, inner)
        for node in g.node:  # the producer writes the float32 tensor
            node.output[:] = [inner if name == out.name else name for name in node.output]
        tail.append(helper.make_node("Cast", [inner], [out.name], to=HALF, name=inner))
    nodes = [*head, *g.node, *tail]
    del g.node[:]
    g.node.extend(nodes)
    return len(head) + len(tail)


def _to_single(values: list[onnx.ValueInfoProto]) -> int:
    """Make the float16 ones of `values` float32; how many changed."""
    changed = [vi for vi in values if _is_half(vi)]
    for vi in changed:
        vi.type.tensor_type.elem_type = SINGLE
    return len(changed)


def _rename_reads(g: onnx.GraphProto, old: str, new: str) -> None:
    for node in g.node:
        node.input[:] = [new if name == old else name for name in node.input]


def _is_half(value_info: onnx.ValueInfoProto) -> bool:
    return value_info.type.tensor_type.elem_type == HALF


def _has_half(g: onnx.GraphProto) -> bool:
    """Whether a subgraph holds float16 anywhere: weights, Constants, produced or typed
    values."""
    return (
        any(t.data_type == HALF for t in g.initializer)
        or any(_is_half(vi) for vi in [*g.input, *g.output, *g.value_info])
        or any(_node_has_half(node) for node in g.node)
    )


def _node_has_half(node: onnx.NodeProto) -> bool:
    tensor = _attribute_tensor(node)
    return (tensor is not None and tensor.data_type == HALF) or bool(_half_types(node))


def _half_types(node: onnx.NodeProto) -> list[onnx.AttributeProto]:
    """The node's attributes that make it produce float16."""
    return [
        attr
        for attr in node.attribute
        if attr.name in TYPE_ATTRIBUTES and attr.type == attr.INT and attr.i == HALF
    ]


def _subgraphs_in_float16(g: onnx.GraphProto) -> bool:
    """Whether an If/Loop/Scan body (at any depth) holds float16."""
    return any(
        _has_half(sub) or _subgraphs_in_float16(sub)
        for node in g.node
        for sub in graph.subgraphs(node)
    )
