"""onnxruntime for the whole tool: CPU sessions (unoptimised by default, so runtime fusions
cannot hide graph bugs), runs of one batch or many, and `capture`, which exposes intermediate
tensors and hands them over batch by batch."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress import model_copies
from onnxcompress.errors import ORT_LOG_SEVERITY, CompressError

# Only fatal messages: onnxruntime's own errors reach the user as our one line.
ort.set_default_logger_severity(ORT_LOG_SEVERITY)

Batch = dict[str, np.ndarray]


def session_options(threads: int = 2, optimize: bool = False) -> ort.SessionOptions:
    """CPU options shared by validation and benchmarking; optimisations only when asked."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = ORT_LOG_SEVERITY
    return options


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    threads: int = 2,
    optimize: bool = False,
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """A CPU session; unoptimised by default, so runtime fusions cannot hide graph bugs.
    `model` may be a path (its external data beside it); a model too large for one protobuf
    is written to a temporary file first (see large_models)."""
    from onnxcompress import large_models

    options = options or session_options(threads, optimize)
    if isinstance(model, onnx.ModelProto) and large_models.too_large(model):
        with large_models.written(model) as path:
            return make_session(path, options=options)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = str(model)
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        raise CompressError(f"onnxruntime cannot run the model: {ort_message(exc)}") from exc


def expose_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy with `names` (intermediate tensors) added as graph outputs, so one onnxruntime
    run returns them; onnxruntime types them itself."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {out.name for out in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return exposed


def expose_only(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy whose only outputs are `names`, cut down to the nodes they depend on:
    onnxruntime runs every node of a graph whatever outputs are asked for, so a refit that
    reads an early tensor would otherwise pay for the whole model. Built without the weights
    it leaves out (a whole copy would hold every weight twice). Graphs with subgraphs (If,
    Loop, Scan) are only exposed, not cut: their bodies may read any outer tensor."""
    outputs = [onnx.ValueInfoProto(name=n) for n in names]
    if has_subgraphs(model):
        cut = onnx.ModelProto()
        cut.CopyFrom(model)
        del cut.graph.output[:]
        cut.graph.output.extend(outputs)
        return cut
    needed, keep = set(names), []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    unread = {init.name for init in model.graph.initializer if init.name not in needed}
    cut = model_copies.copy_without_initializers(model, unread)
    inputs = [value for value in cut.graph.input if value.name in needed]
    for field, items in ((cut.graph.node, keep[::-1]), (cut.graph.input, inputs)):
        del field[:]
        field.extend(items)
    del cut.graph.output[:]
    cut.graph.output.extend(outputs)
    return cut


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether a node carries a graph (If, Loop, Scan): its body may read any outer tensor, so
    the graph cannot be cut into parts by what nodes read."""
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for node in model.graph.node for a in node.attribute)


def downstream_cut(model: onnx.ModelProto, node_name: str) -> tuple[onnx.ModelProto, list[str]]:
    """The part of `model` that node `node_name` can change: that node and every node after
    it that reads what it writes, as a model (`nodes_as_model`) whose outputs are the graph
    outputs among what they write; and its frontier, the tensors it reads from the rest
    (compute them from the whole model, then `type_inputs`). Graphs with subgraphs are not
    cut (ValueError)."""
    if has_subgraphs(model):
        raise ValueError("graphs with subgraphs are not cut")
    names = [node.name for node in model.graph.node]
    if node_name not in names:
        raise ValueError(f"no node {node_name!r}")
    keep, written = [], set()
    for node in model.graph.node[names.index(node_name) :]:
        if node.name == node_name or written.intersection(node.input):
            keep.append(node)
            written.update(node.output)
    outputs = [out for out in model.graph.output if out.name in written]
    return nodes_as_model(model, keep, outputs)


def nodes_as_model(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto]
) -> tuple[onnx.ModelProto, list[str]]:
    """`nodes` of `model` as a model of their own giving `outputs`, with the weights they read
    (also listed among the inputs, as IR < 4 wants) and fed the tensors they read that none of
    them writes: those names are returned too, and their inputs left untyped (`type_inputs`).
    Built field by field: a copy of the model would copy every weight."""
    constants = {init.name for init in model.graph.initializer}
    written = {o for node in nodes for o in node.output}
    read = list(dict.fromkeys(i for node in nodes for i in node.input if i))
    fed = [name for name in read if name not in written and name not in constants]
    needed = set(read)
    initializers = [init for init in model.graph.initializer if init.name in needed]
    listed = {init.name for init in initializers}
    inputs = [onnx.ValueInfoProto(name=name) for name in fed]
    inputs += [value for value in model.graph.input if value.name in listed]
    part = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    part.functions.extend(model.functions)
    part.graph.name = model.graph.name
    part.graph.node.extend(nodes)
    part.graph.input.extend(inputs)
    part.graph.output.extend(outputs)
    part.graph.initializer.extend(initializers)
    return part, fed


def type_inputs(model: onnx.ModelProto, batch: Batch) -> None:
    """Give `model`'s untyped graph inputs the element types of `batch`'s arrays (shapes left
    free)."""
    for value in model.graph.input:
        if value.HasField("type"):
            continue
        elem = onnx.helper.np_dtype_to_tensor_dtype(batch[value.name].dtype)
        value.type.CopyFrom(onnx.helper.make_tensor_type_proto(elem, None))


def paired_outputs(
    original: onnx.ModelProto,
    source: str,
    rewritten: onnx.ModelProto,
    target: str,
    batches: list[Batch],
    threads: int,
) -> Iterator[tuple[Batch, np.ndarray, np.ndarray]]:
    """(batch, tensor `source` of the original, tensor `target` of the rewritten model) for
    every batch: what a calibration refit reads. Each model is cut to what its tensor needs."""
    sessions = [
        make_session(expose_only(model, [name]), threads=threads, optimize=True)
        for model, name in ((original, source), (rewritten, target))
    ]
    for batch in batches:
        (value,) = run_session(sessions[0], batch, [source])
        (other,) = run_session(sessions[1], batch, [target])
        yield batch, value, other


def run_session(
    session: ort.InferenceSession, batch: dict[str, np.ndarray], output_names=None
) -> list[np.ndarray]:
    """Run one batch, feeding the inputs the session takes."""
    feeds = {}
    for inp in session.get_inputs():
        if inp.name not in batch:
            raise CompressError(f"no data for model input '{inp.name}'")
        feeds[inp.name] = batch[inp.name]
    try:
        return session.run(output_names, feeds)
    except Exception as exc:
        raise CompressError(f"onnxruntime failed running the model: {ort_message(exc)}") from exc


def run_model(
    model: onnx.ModelProto | bytes,
    batches: list[dict[str, np.ndarray]],
    threads: int = 2,
    output_names: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Outputs over all batches, concatenated along axis 0 (scalars become one row each)."""
    session = make_session(model, threads)
    names = output_names or [out.name for out in session.get_outputs()]
    unknown = sorted(set(names) - {out.name for out in session.get_outputs()})
    if unknown:
        raise CompressError(f"the model has no output(s) {', '.join(unknown)}")
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in batches:
        for name, value in zip(names, run_session(session, batch, names), strict=True):
            collected[name].append(np.atleast_1d(value))
    return {name: np.concatenate(parts) for name, parts in collected.items() if parts}


# `file.cc:81 Type ns::Function(args)`, and ORT_ENFORCE's `cond was false.` after it.
_SOURCE_LOCATION = re.compile(
    r"\S+\.(?:h|cc|cpp):\d+ [^(\n]*\([^)\n]*\)(?:[^.\n]* was false\.)?\s*"
)


def ort_message(exc: Exception) -> str:
    """onnxruntime's message without its status prefix, C++ source location and the failed
    check's wording (`file.h:81 Type ns::Function(args) cond was false.`), wherever they are."""
    text = str(exc).strip()
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = _SOURCE_LOCATION.sub("", text)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def capture(
    model: onnx.ModelProto,
    names: list[str],
    batches: Iterable[Batch],
    threads: int = 2,
    optimize: bool = True,
) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
    """Run `model` on each batch with the tensors `names` exposed as outputs, in one session;
    yields (batch, {name: value}). Optimised by default: it reads activations, it checks no
    graph."""
    session = make_session(expose_outputs(model, names), threads=threads, optimize=optimize)
    for batch in batches:
        yield batch, dict(zip(names, run_session(session, batch, names), strict=True))
