"""Per-node parameters, MACs and output bytes of a model at concrete input shapes.

One MAC counter per op kind lives in `MAC_COUNTERS`; the same figures feed the passes (rank
choice, budgets), the report and the tests. FLOPs = 2 × MACs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress import graph, large_models, model_copies
from onnxcompress.errors import ORT_LOG_SEVERITY
from onnxcompress.report.tables import format_table, human  # noqa: F401  (re-exported for callers)

log = logging.getLogger(__name__)

# Looks up the concrete dims of a tensor by name; raises ShapeUnknown when it cannot.
ShapeOf = Callable[[str], list[int]]


class ShapeUnknown(LookupError):
    """A counter needed a tensor whose shape neither onnx nor onnxruntime could tell."""


@dataclass
class NodeStats:
    name: str
    op: str
    params: int  # elements of the floating-point constants this node reads
    macs: int  # multiply-accumulates; FLOPs = 2 * MACs
    output_bytes: int
    output_shapes: list[list[int]]
    weight_inputs: list[str]
    note: str = ""  # why a figure may be incomplete, e.g. "shape unknown"

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        if not record["note"]:
            del record["note"]
        return record


@dataclass
class ModelAnalysis:
    nodes: list[NodeStats]
    input_shapes: dict[str, list[int]]
    total_macs: int
    total_params: int  # each constant float tensor once, even when several nodes read it
    weight_bytes: int  # bytes of those tensors at their stored dtype (fp16 = 2 bytes)

    def by_name(self) -> dict[str, NodeStats]:
        return {stats.name: stats for stats in self.nodes}

    def macs_by_op(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for stats in self.nodes:
            totals[stats.op] = totals.get(stats.op, 0) + stats.macs
        return totals

    def to_dict(self) -> dict:
        return {
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
            "total_macs": self.total_macs,
            "total_flops": 2 * self.total_macs,
            "total_params": self.total_params,
            "weight_bytes": self.weight_bytes,
            "macs_by_op": self.macs_by_op(),
            "nodes": [stats.to_dict() for stats in self.nodes],
        }


# --- MAC counters: (node, shape_of) -> MACs. Bias and activation adds are not MACs. ---------


def conv_macs(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """Output elements × (C_in / groups) × kernel volume, for 1-, 2- and 3-D convolutions.

    The output shape comes from shape inference, so strides, dilations, pads and auto_pad are
    already in it; W is [C_out, C_in/groups, k...]. The bias add is not counted as MACs.
    """
    return _prod(shape_of(node.output[0])) * _prod(shape_of(node.input[1])[1:])


def conv_transpose_macs(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """Input elements (N·C_in·spatial) × (C_out / groups) × kernel volume.

    W is [C_in, C_out/groups, k...]; every input pixel scatters a full kernel into the output,
    whatever the stride. The bias add is not counted.
    """
    return _prod(shape_of(node.input[0])) * _prod(shape_of(node.input[1])[1:])


def gemm_macs(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """M·N·K, reading A and B through transA/transB; alpha, beta and the C add cost no MACs."""
    attrs = graph.node_attributes(node)
    a, b = shape_of(node.input[0]), shape_of(node.input[1])
    m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
    n = b[0] if attrs.get("transB", 0) else b[1]
    return m * n * k


def matmul_macs(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """prod(output shape) × K, which covers numpy-style batch broadcasting and 1-D operands."""
    return _prod(shape_of(node.output[0])) * shape_of(node.input[0])[-1]


def recurrent_macs(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """Gate matmuls per timestep: seq × batch × directions × gates·hidden × (input + hidden).

    W is [directions, gates·hidden, input] and R is [directions, gates·hidden, hidden], with
    4 gates for LSTM, 3 for GRU, 1 for RNN. The element-wise gate maths is left out.
    """
    x, w, r = shape_of(node.input[0]), shape_of(node.input[1]), shape_of(node.input[2])
    seq, batch = (x[1], x[0]) if graph.node_attributes(node).get("layout", 0) else (x[0], x[1])
    directions, gate_rows, input_size = w
    return seq * batch * directions * gate_rows * (input_size + r[2])


def pool_macs(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """Output elements × kernel volume (one compare or add per window element)."""
    return _prod(shape_of(node.output[0])) * _prod(graph.node_attributes(node)["kernel_shape"])


def input_elements_macs(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """Global pools and reductions touch every input element once."""
    return _prod(shape_of(node.input[0]))


def elementwise_macs(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """One MAC per output element: the floor for any op that computes (Add, Relu, BN, ...)."""
    return _prod(shape_of(node.output[0]))


def no_macs(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """Data movement, shape arithmetic and control flow compute nothing worth counting."""
    return 0


_DATA_MOVEMENT = (
    "Reshape Transpose Flatten Concat Slice Gather GatherElements GatherND Shape Size Constant "
    "ConstantOfShape Identity Squeeze Unsqueeze Cast CastLike Split Expand Tile Pad Dropout "
    "DepthToSpace SpaceToDepth Range NonZero ScatterND ScatterElements Crop If Loop Scan"
).split()
_REDUCTIONS = (
    "GlobalAveragePool GlobalMaxPool GlobalLpPool ReduceMean ReduceSum ReduceMax ReduceMin "
    "ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare"
).split()

# Conversions around int8 kernels: runtimes fold the weights' DequantizeLinear at load and fuse
# the activations' pairs into the integer op, so they count like the data movement above.
_QDQ = ("QuantizeLinear", "DequantizeLinear")

MAC_COUNTERS: dict[str, Callable[[onnx.NodeProto, ShapeOf], int]] = {
    "Conv": conv_macs,
    "ConvTranspose": conv_transpose_macs,
    "Gemm": gemm_macs,
    "MatMul": matmul_macs,
    "LSTM": recurrent_macs,
    "GRU": recurrent_macs,
    "RNN": recurrent_macs,
    "MaxPool": pool_macs,
    "AveragePool": pool_macs,
    "LpPool": pool_macs,
    **{op: input_elements_macs for op in _REDUCTIONS},
    **{op: no_macs for op in (*_DATA_MOVEMENT, *_QDQ)},
}
_SUBGRAPH_OPS = {"If", "Loop", "Scan"}
# protobuf cannot serialise 2 GiB; such models keep their unknown shapes.
_MAX_PROTOBUF_BYTES = 2**31 - 1


# --- the analysis ---------------------------------------------------------------------------


def analyse(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]] | None = None,
    *,
    runtime_fallback: bool = True,
) -> ModelAnalysis:
    """Params, MACs and output sizes of every top-level node at concrete input shapes.

    Dynamic dims must be pinned (`input_shapes`, else CompressError); the caller's model is not
    modified. Tensors onnx shape inference leaves unknown are asked of onnxruntime once
    (`runtime_fallback`); a node whose shapes stay unknown gets 0 MACs and note "shape unknown".
    """
    shapes = graph.resolve_input_shapes(model, input_shapes)
    # Shapes come from the skeleton: no weight is copied or serialised for them.
    pinned = graph.with_input_shapes(model_copies.skeleton(model), shapes)
    tensors = _known_tensors(graph.infer_shapes(pinned))
    constants = _constant_shapes(model)
    # Weights: float constants, and the integer data of a DequantizeLinear (quantized weights).
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weights = {n: v for n, v in constants.items() if _is_float(v) or n in quantized}
    for name, value in constants.items():
        if name not in tensors and _elem_type(value):
            tensors[name] = (list(value.shape), _elem_type(value))
    missing = [
        out for node in model.graph.node for out in node.output if out and out not in tensors
    ]
    if missing and runtime_fallback and not large_models.too_large(model):
        pinned = graph.with_input_shapes(model, shapes)  # the probe runs: weights needed
        tensors.update(_shapes_from_onnxruntime(pinned, shapes, missing))

    def shape_of(name: str) -> list[int]:
        if name not in tensors:
            raise ShapeUnknown(name)
        return tensors[name][0]

    nodes, seen, used = [], set(), set()
    for index, node in enumerate(model.graph.node):
        name = node.name if node.name and node.name not in seen else f"{node.op_type}_{index}"
        seen.add(name)
        stats = _node_stats(node, name, shape_of, tensors, weights)
        used.update(stats.weight_inputs)
        nodes.append(stats)
    return ModelAnalysis(
        nodes=nodes,
        input_shapes=shapes,
        total_macs=sum(stats.macs for stats in nodes),
        total_params=sum(weights[name].size for name in used),
        weight_bytes=sum(weights[name].nbytes for name in used),
    )


def _constant_shapes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant (graph.constant_tensors) as an array of its shape and dtype; an
    initializer's is a zero-stride view that reads none of its data (counts need no more)."""
    constants = graph.constant_tensors(model, initializers=False)
    for tensor in model.graph.initializer:
        try:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        except (KeyError, ValueError):  # no numpy type: read it as it is
            constants[tensor.name] = numpy_helper.to_array(tensor)
            continue
        constants[tensor.name] = np.broadcast_to(np.zeros((), dtype), tuple(tensor.dims))
    return constants


def flops_by_node(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
) -> dict[str, int]:
    """Node name -> MACs (FLOPs are twice that), for callers that need nothing else."""
    return {stats.name: stats.macs for stats in analyse(model, input_shapes).nodes}


def _node_stats(node, name, shape_of, tensors, weights) -> NodeStats:
    read = list(node.input) + _subgraph_reads(node)
    weight_inputs = list(dict.fromkeys(n for n in read if n in weights))
    outputs = [out for out in node.output if out]
    notes = []
    counter = MAC_COUNTERS.get(node.op_type, elementwise_macs)
    if node.domain not in ("", "ai.onnx"):
        counter = elementwise_macs
        notes.append(f"no MAC formula for {node.domain}.{node.op_type}; one per output element")
    unknown = any(out not in tensors for out in outputs)
    try:
        macs = counter(node, shape_of)
    except ShapeUnknown:
        macs, unknown = 0, True
    if unknown:
        notes.insert(0, "shape unknown")
    if node.op_type in _SUBGRAPH_OPS:
        notes.append("subgraph not counted")
    return NodeStats(
        name=name,
        op=node.op_type,
        params=sum(weights[n].size for n in weight_inputs),
        macs=int(macs),
        output_bytes=sum(_nbytes(*tensors[out]) for out in outputs if out in tensors),
        output_shapes=[list(tensors[out][0]) if out in tensors else [] for out in outputs],
        weight_inputs=weight_inputs,
        note="; ".join(notes),
    )


def _subgraph_reads(node: onnx.NodeProto) -> list[str]:
    """Names read inside If/Loop/Scan bodies: outer-scope weights count for the parent node."""
    reads = []
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            for inner in body.node:
                reads.extend(inner.input)
                reads.extend(_subgraph_reads(inner))
    return reads


def _known_tensors(inferred: onnx.ModelProto) -> dict[str, tuple[list[int], int]]:
    """Name -> (dims, elem_type) for every tensor whose dims are all concrete."""
    known = {}
    for name, info in graph.value_infos(inferred).items():
        tensor_type = info.type.tensor_type
        if not info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
            continue
        dims = graph.dim_values(info)
        if all(isinstance(d, int) and d >= 0 for d in dims) and tensor_type.elem_type:
            known[name] = (dims, tensor_type.elem_type)
    return known


def _shapes_from_onnxruntime(
    pinned: onnx.ModelProto, shapes: dict[str, list[int]], names: list[str]
) -> dict[str, tuple[list[int], int]]:
    """Ask onnxruntime for tensors onnx could not shape (unknown ops, data-dependent shapes).

    Its own inference often knows them at session creation (e.g. experimental ops); the rest
    come from one run on zero inputs. Any failure only means those shapes stay unknown.
    """
    try:
        import onnxruntime as ort  # imported here: most models never need it

        ort.set_default_logger_severity(ORT_LOG_SEVERITY)
        if pinned.ByteSize() >= _MAX_PROTOBUF_BYTES:
            raise ValueError("model too large to hand to onnxruntime in memory")
        probe = onnx.ModelProto()
        probe.CopyFrom(pinned)
        listed = {out.name for out in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in listed)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = ORT_LOG_SEVERITY
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        found, pending = {}, []
        for out in session.get_outputs():
            if out.name not in names or not out.type.startswith("tensor("):
                continue
            elem_type = _ort_elem_type(out.type)
            # get_outputs reports an unknown rank as [], so a scalar there is checked by a run.
            if out.shape and all(isinstance(d, int) and d >= 0 for d in out.shape):
                found[out.name] = (list(out.shape), elem_type)
            else:
                pending.append((out.name, elem_type))
        if pending:
            feeds = {
                inp.name: _probe_input(inp, shapes[inp.name])
                for inp in session.get_inputs()
                if inp.name in shapes  # old IRs list initializers as inputs too
            }
            values = session.run([n for n, _ in pending], feeds)
            for (name, elem_type), value in zip(pending, values, strict=True):
                found[name] = (list(value.shape), elem_type)
        return found
    except Exception as exc:  # onnxruntime raises many types; the analysis goes on without
        log.info("onnxruntime could not resolve %d tensor shapes: %s", len(names), exc)
        return {}


def _ort_elem_type(type_name: str) -> int:
    """'tensor(float16)' -> TensorProto.FLOAT16: onnxruntime names types as ONNX does."""
    return onnx.TensorProto.DataType.Value(type_name[len("tensor(") : -1].upper())


def _probe_input(inp, shape: list[int]) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(_ort_elem_type(inp.type))
    # Integers get ones, not zeros: an integer division by zero would kill the process.
    fill = np.zeros if dtype.kind in "fcb" else np.ones
    return fill(shape, dtype=dtype)


def _is_float(value: np.ndarray) -> bool:
    # bfloat16 and float8 from ml_dtypes are not numpy floating kinds; their names say float.
    return value.dtype.kind == "f" or "float" in value.dtype.name


def _elem_type(value: np.ndarray) -> int:
    """The ONNX element type of an array, or 0 when it has none (object arrays)."""
    try:
        return helper.np_dtype_to_tensor_dtype(value.dtype)
    except (KeyError, TypeError, ValueError):
        return 0


def _nbytes(dims: list[int], elem_type: int) -> int:
    return _prod(dims) * helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def _prod(values) -> int:
    return int(math.prod(int(v) for v in values))
