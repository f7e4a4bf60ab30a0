"""Graph helpers shared by the core and the passes: constants, shapes, producers, cleanup."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxcompress.errors import CompressError, first_line
from onnxcompress.model_copies import skeleton

# IR 3 requires every initializer to be listed as a graph input; from IR 4 on it is optional.
MIN_IR_WITHOUT_INITIALIZER_INPUTS = 4


def constant_tensors(model: onnx.ModelProto, initializers: bool = True) -> dict[str, np.ndarray]:
    """Every tensor whose value is fixed in the file: initializers and `Constant` outputs
    (only the latter with `initializers=False`).

    Initializers that old exporters also list as graph inputs count as constants too: the
    tool treats them as weights, as every runtime does when the caller does not feed them.
    """
    values = {}
    if initializers:
        values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = constant_node_value(node)
            if value is not None:
                values[node.output[0]] = value
    return values


class LazyConstants(Mapping):
    """`constant_tensors(model)` read on demand: a tensor becomes an array when first looked
    up (then kept), so code that looks at a few weights of a large model holds only those."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._tensors = {init.name: init for init in model.graph.initializer}
        self._values = constant_tensors(model, initializers=False)
        self._names = list(dict.fromkeys([*self._tensors, *self._values]))

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._values:
            self._values[name] = numpy_helper.to_array(self._tensors[name])  # KeyError if none
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors or name in self._values

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a `Constant` node, whatever attribute carries it (None if sparse)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def lift_constant_nodes(model: onnx.ModelProto) -> None:
    """Turn, in place, every top-level `Constant` node that holds a tensor (paddle2onnx and
    torch exports keep weights so) into an initializer of the same name, as onnxruntime does at
    load: passes that rewrite weights find them where they look."""
    g, outputs, kept = model.graph, {o.name for o in model.graph.output}, []
    for node in g.node:
        value = constant_node_value(node) if node.op_type == "Constant" else None
        if value is None or node.domain not in ("", "ai.onnx") or node.output[0] in outputs:
            kept.append(node)
            continue
        g.initializer.append(numpy_helper.from_array(value, node.output[0]))
    if len(kept) < len(g.node):  # IR 3 would want the new initializers listed as inputs too
        model.ir_version = max(model.ir_version, MIN_IR_WITHOUT_INITIALIZER_INPUTS)
    del g.node[:]
    g.node.extend(kept)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every constant tensor (initializers and Constant values)."""
    return sum(value.nbytes for value in constant_tensors(model).values())


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies (If branches, Loop/Scan bodies) held in `node`'s attributes."""
    return [
        sub for attr in node.attribute for sub in ([attr.g] if attr.HasField("g") else attr.graphs)
    ]


def subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read or written inside the subgraphs (If/Loop/Scan bodies) of `node`,
    at any depth: rewrites must leave these tensors as they are."""
    names: set[str] = set()
    for sub in subgraphs(node):
        for inner in sub.node:
            names.update(inner.input)
            names.update(inner.output)
            names |= subgraph_names(inner)
    return names


def names_in_subgraphs(g: onnx.GraphProto) -> set[str]:
    """`subgraph_names` of every node of `g`."""
    return set().union(*(subgraph_names(node) for node in g.node))


def runtime_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that a caller feeds (those that are not also initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output if out}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


# Ops whose weights make them the layers of a model (what the passes rewrite and quantize).
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def int8_layers(model: onnx.ModelProto) -> set[str]:
    """The layers (by name, else first output) of a QDQ model that run in int8: their weight
    comes from a DequantizeLinear."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {
        node.name or node.output[0]
        for node in model.graph.node
        if node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in dequantized
    }


def float_region(model: onnx.ModelProto, layers: list[str]) -> list[str]:
    """Names of the nodes to leave in float, in graph order, for the named layers to run in
    float inside an int8 model: each layer, the one-input ops after it (activations, pools),
    and the next layers they reach, so int8 resumes at a layer's output, not a pool's.
    (Why: onnxruntime moves a QuantizeLinear up over a MaxPool and then runs the pool on
    uint8 in NCHW, far slower; see docs/decisions.md#graphfloat_region)
    Ops with several activation inputs (Add, Concat) end the region: their inputs meet there."""
    constants = set(constant_tensors(model))
    users = consumers(model)
    seeds = set(layers)
    region: set[str] = set()
    stack = [node for node in model.graph.node if node.name in seeds]
    while stack:
        node = stack.pop()
        if node.name in region:
            continue
        region.add(node.name)
        for user in (u for out in node.output for u in users.get(out, [])):
            if user.op_type in LAYER_OPS:
                region.add(user.name)
            elif sum(1 for name in user.input if name and name not in constants) == 1:
                stack.append(user)
    return [node.name for node in model.graph.node if node.name in region]


def fresh_name(base: str, used: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, … : the first not in `used` (which it joins)."""
    name, counter = base, 1
    while name in used:
        name, counter = f"{base}_{counter}", counter + 1
    used.add(name)
    return name


def node_attributes(node: onnx.NodeProto) -> dict:
    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise CompressError("model imports no version of the default ONNX domain")


def dim_values(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims of a tensor type: ints where fixed, the symbol (or None) where dynamic."""
    dims = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or None)
    return dims


def resolve_input_shapes(
    model: onnx.ModelProto, pinned: dict[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """Concrete shapes for every runtime input.

    `pinned` (from `--input-shape`) wins. A dynamic leading dim defaults to 1 (a batch); a
    symbolic dim named like one already resolved takes its value. Anything else is an error
    that tells the user how to pin it.
    """
    pinned = dict(pinned or {})
    names = {inp.name for inp in runtime_inputs(model)}
    unknown = sorted(set(pinned) - names)
    if unknown:
        raise CompressError(
            f"--input-shape names unknown input(s) {', '.join(unknown)}; "
            f"inputs are: {', '.join(sorted(names))}"
        )
    symbols: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for inp in runtime_inputs(model):
        dims = dim_values(inp)
        if inp.name in pinned:
            shape = list(pinned[inp.name])
            if len(shape) != len(dims):
                raise CompressError(
                    f"--input-shape {inp.name}: gives {len(shape)} dims, the input has {len(dims)}"
                )
            for dim, value in zip(dims, shape, strict=True):
                if isinstance(dim, int) and dim != value:
                    raise CompressError(
                        f"--input-shape {inp.name}: dim {dim} is fixed in the model, got {value}"
                    )
                if isinstance(dim, str):
                    symbols.setdefault(dim, value)
            shapes[inp.name] = shape
            continue
        shape = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif isinstance(dim, str) and dim in symbols:
                shape.append(symbols[dim])
            elif axis == 0:
                shape.append(1)
                if isinstance(dim, str):
                    symbols[dim] = 1
            else:
                example = ",".join(str(d) if isinstance(d, int) else "N" for d in dims)
                raise CompressError(
                    f"input '{inp.name}' has dynamic dims {_format_dims(dims)}; pin them with "
                    f"--input-shape {inp.name}:{example}"
                )
        shapes[inp.name] = shape
    return shapes


def _format_dims(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of the model whose runtime inputs have the given concrete shapes."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for inp in pinned.graph.input:
        if inp.name in shapes:
            tensor_shape = inp.type.tensor_type.shape
            tensor_shape.ClearField("dim")
            for value in shapes[inp.name]:
                tensor_shape.dim.add().dim_value = int(value)
    return pinned


def infer_shapes(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """onnx shape inference with data propagation; strict raises on any inconsistency. Runs
    on the model's skeleton: the result's value infos are the model's, its large weights hold
    no data (inference reads none; copying and serialising them cost memory, and fail past
    protobuf's 2 GB)."""
    try:
        return onnx.shape_inference.infer_shapes(
            skeleton(model), check_type=True, strict_mode=strict, data_prop=True
        )
    except Exception as exc:
        raise CompressError(f"shape inference failed: {first_line(exc)}") from exc


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every typed tensor: graph inputs, outputs and inferred intermediates."""
    infos = {vi.name: vi for vi in model.graph.value_info}
    infos.update({vi.name: vi for vi in model.graph.input})
    infos.update({vi.name: vi for vi in model.graph.output})
    return infos


def cleanup_and_sort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop dead nodes and unused weights, then sort topologically (after every pass)."""
    unnamed = _unnamed_attribute_tensors(model.graph)
    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result = gs.export_onnx(graph, do_type_check=False)
    # graphsurgeon's export sets `name` on the tensors it was given (ConstantOfShape's value):
    # clear it again, so that the model given stays as it was (the pass contract).
    for tensor in unnamed:
        tensor.ClearField("name")
    _keep_model_metadata(model, result)
    return result


def _unnamed_attribute_tensors(g: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The tensor attributes without a name of every node of `g`, subgraphs included."""
    found = []
    for node in g.node:
        for attr in node.attribute:
            if attr.HasField("t") and not attr.t.HasField("name"):
                found.append(attr.t)
        for sub in subgraphs(node):
            found += _unnamed_attribute_tensors(sub)
    return found


def _keep_model_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    # graphsurgeon drops initializers from the input list; older IRs require them there.
    target.ir_version = max(source.ir_version, MIN_IR_WITHOUT_INITIALIZER_INPUTS)
    target.producer_name = source.producer_name
    target.producer_version = source.producer_version
    target.domain = source.domain
    target.model_version = source.model_version
    target.doc_string = source.doc_string
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
    del target.opset_import[:]
    target.opset_import.extend(source.opset_import)


def check_model(model: onnx.ModelProto) -> None:
    """`onnx.checker` full check plus strict shape inference, as every written model must pass."""
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise CompressError(f"model fails the ONNX checker: {first_line(exc)}") from exc
