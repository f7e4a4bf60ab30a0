"""After channels are removed, refit each consumer by least squares (He et al. 2017 / ThiNet):
its weights and bias are chosen so that its outputs, computed from the *pruned* model's own
activations, match the original model's outputs of that node on calibration data. Consumers go
in graph order, so each sees the earlier refits. One run of the original per batch collects
every consumer's targets at a seeded sample of rows (output positions); each consumer then
runs only the part of the pruned model it needs. A k×k Conv is solved on im2col patches; with
more features than `max_features` only its bias is refit. A refit that would raise the
consumer's calibration error is not applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.channels.activations import (
    input_features,
    output_rows,
    output_table,
    prefix,
    prepared_input,
    rows_per_batch,
    sample_rows,
    weight_as_features,
)
from onnxcompress.channels.groups import ChannelGraph, label
from onnxcompress.channels.refit_targets import judged_at, tensor_shapes
from onnxcompress.channels.surgery import ConstantEditor
from onnxcompress.maths.least_squares import LeastSquaresAccumulator
from onnxcompress.maths.rectified_fit import downstream_error, downstream_fit
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import capture

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 2_000_000  # patch rows × features built at once
# Rows × features a rectified refit keeps: 80 MB in float32, ~250 MB more while it solves in
# float64; ResNet-20's largest consumer needs 9.4M (16384 rows × 576 features).
STORED_ELEMENTS = 20_000_000


@dataclass
class Site:
    """One consumer to refit and the original model's outputs it must match."""

    node: int
    target: str  # the node's output, or the output of the bias Add after a MatMul
    kept_out: np.ndarray | None  # output positions that survive pruning (None: all)
    reason: str = ""  # why it is not refit
    offset: str = ""  # the pruned model's tensor added to the output before `target`
    rectified: bool = False  # a Relu reads `target`: only its positive part must match
    rows: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # per batch
    targets: list[np.ndarray] = field(default_factory=list)  # per batch: [rows, outputs]


def refit_consumers(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    channel_graph: ChannelGraph,
    keep: dict[int, np.ndarray],
    context: PassContext,
    max_features: int = 4608,
    judge: str = "output",
) -> dict[str, dict[str, Any]]:
    """Refit, in place in `pruned`, every consumer whose input channels were pruned; returns
    per consumer (by name) what was done and its calibration error before and after.
    `judge`: match each consumer's own output, or the residual Add it feeds ("add"), or also
    only what a Relu after that lets through ("relu"); see `refit_targets`."""
    sites = _sites(original, channel_graph, keep)
    if judge != "output":
        _judge_downstream(original, sites, context.input_shapes, rectify=judge == "relu")
    _collect_targets(original, [s for s in sites if not s.reason], context)
    results = {}
    for site in sites:
        node = pruned.graph.node[site.node]
        if site.reason:
            results[label(node)] = {"mode": "none", "reason": site.reason}
        else:
            results[label(node)] = _refit(pruned, node, site, context, max_features)
        site.rows, site.targets = [], []
        log.debug("refit %s: %s", label(node), results[label(node)])
    return results


def _sites(model, channel_graph: ChannelGraph, keep) -> list[Site]:
    consumers = sorted(
        {
            e.node
            for e in channel_graph.edits
            if e.kind == "consumer" and channel_graph.touches(e, keep)
        }
    )
    kept_out = {
        e.node: channel_graph.positions(e.layout, keep)
        for e in channel_graph.edits
        if e.kind == "producer" and channel_graph.touches(e, keep)
    }
    constants = graph.constant_tensors(model)
    sites = []
    for index in consumers:
        node = model.graph.node[index]
        reason = _unsupported(model, node, constants)
        target = "" if reason else _target_tensor(model, node, constants)
        sites.append(Site(index, target, kept_out.get(index), reason))
    return sites


def _unsupported(model: onnx.ModelProto, node: onnx.NodeProto, constants: dict) -> str:
    attrs = graph.node_attributes(node)
    if node.op_type == "Conv":
        if int(attrs.get("group", 1)) != 1:
            return "grouped Conv: not refit"
        if constants[node.input[1]].ndim != 4:
            return "only 2-D convolutions are refit"
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            return "auto_pad SAME_*: not refit"
        return ""
    if node.op_type == "Gemm":
        c = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if c is not None and c.ndim > 1 and any(d != 1 for d in c.shape[:-1]):
            return "Gemm C is not a vector: not refit"
        return "" if graph.default_opset(model) >= 7 else "Gemm before opset 7: not refit"
    if node.op_type == "MatMul":
        if _bias_add(model, node, constants) is None:
            return "MatMul not followed by a bias Add: not refit"
        return ""
    return f"{node.op_type}: not refit"


def _judge_downstream(model, sites: list[Site], input_shapes, rectify: bool) -> None:
    constants = graph.constant_tensors(model)
    shapes = tensor_shapes(model, input_shapes)
    for site in sites:
        node = model.graph.node[site.node]
        if site.reason or node.op_type not in ("Conv", "Gemm"):
            continue
        judged = judged_at(model, node, constants, shapes)
        site.target, site.offset = judged.target, judged.offset
        site.rectified = rectify and judged.rectified


def _target_tensor(model, node: onnx.NodeProto, constants: dict) -> str:
    if node.op_type == "MatMul":
        return _bias_add(model, node, constants)[0].output[0]
    return node.output[0]


def _collect_targets(original: onnx.ModelProto, sites: list[Site], context: PassContext) -> None:
    """One run of the original per batch: each site keeps its target rows at sampled rows."""
    if not sites:
        return
    batches = context.calibration or []
    names = list(dict.fromkeys(s.target for s in sites))
    limit = rows_per_batch(len(batches))
    generators = {s.node: np.random.default_rng(context.seed + s.node) for s in sites}
    for _, values in capture(original, names, batches, context.threads):
        for site in sites:
            node, y = original.graph.node[site.node], values[site.target]
            rows = sample_rows(output_rows(node, y.shape), limit, generators[site.node])
            table = output_table(node, y, rows)
            table = table if site.kept_out is None else table[:, site.kept_out]
            site.rows.append(rows)
            site.targets.append(np.ascontiguousarray(table))


def _refit(pruned, node, site: Site, context, max_features) -> dict[str, Any]:
    from onnxcompress.runtime import make_session, run_session

    weights = ConstantEditor(pruned)
    weight = weights.get(node, 1)
    features, outputs = _sizes(node, weight)
    bias_only = node.op_type == "Conv" and features > max_features
    wanted = [node.input[0]] + ([node.output[0]] if bias_only else [])
    wanted += [site.offset] if site.offset else []
    session = make_session(prefix(pruned, wanted), threads=context.threads, optimize=True)
    rows_total = sum(len(t) for t in site.targets)
    # The rectified fit revisits every row, so it keeps them; too many and the plain fit runs.
    stored = _StoredRows() if site.rectified and rows_total * features <= STORED_ELEMENTS else None
    fit = LeastSquaresAccumulator(features, outputs)
    shift = _BiasShift(outputs)
    chunk = max(256, CHUNK_ELEMENTS // max(features, 1))
    for batch, rows, targets in zip(
        context.calibration or [], site.rows, site.targets, strict=True
    ):
        values = dict(zip(wanted, run_session(session, batch, wanted), strict=True))
        offset = output_table(node, values[site.offset], rows) if site.offset else 0.0
        goal = targets - offset  # what the consumer itself has to produce
        if bias_only:
            shift.add(goal, output_table(node, values[node.output[0]], rows))
            continue
        source = prepared_input(node, values[node.input[0]])
        for lo in range(0, len(targets), chunk):
            part = tuple(r[lo : lo + chunk] for r in rows)
            features_part = input_features(node, source, part, weight.shape[2:])
            fit.add(features_part, goal[lo : lo + chunk])
            if stored is not None:
                stored.add(features_part, targets[lo : lo + chunk], offset, lo, chunk)
    if bias_only:
        return _apply_bias_shift(weights, node, shift, features, max_features)
    if stored is not None:
        return _apply_rectified(weights, node, pruned, stored)
    return _apply_least_squares(weights, node, pruned, fit, features)


def _apply_least_squares(weights, node, pruned, fit, features) -> dict[str, Any]:
    projection, bias = _current(weights, node, pruned)
    before = fit.residual_sum_of_squares(projection, bias)
    energy = max(fit.residual_sum_of_squares(np.zeros_like(projection), np.zeros_like(bias)), 1e-30)
    new_projection, new_bias = fit.solve()
    after = fit.residual_sum_of_squares(new_projection, new_bias)
    applied = after < before
    if applied:
        _write(weights, node, pruned, new_projection, new_bias)
    return {
        "mode": "weights+bias" if applied else "kept (refit was not better)",
        "features": features,
        "rows": fit.count,
        "rel_error_before": round(float(np.sqrt(before / energy)), 6),
        "rel_error_after": round(float(np.sqrt(min(after, before) / energy)), 6),
    }


class _StoredRows:
    """Every sampled row of a consumer: inputs, original targets and the offsets added."""

    def __init__(self):
        self.inputs, self.targets, self.offsets = [], [], []

    def add(self, inputs, targets, offset, lo: int, chunk: int) -> None:
        self.inputs.append(inputs.astype(np.float32))
        self.targets.append(targets.astype(np.float32))
        part = offset[lo : lo + chunk] if np.ndim(offset) else np.zeros_like(targets)
        self.offsets.append(np.asarray(part, dtype=np.float32))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.concatenate(x) for x in (self.inputs, self.targets, self.offsets))


def _apply_rectified(weights, node, pruned, stored: _StoredRows) -> dict[str, Any]:
    inputs, targets, offsets = stored.arrays()
    projection, bias = _current(weights, node, pruned)
    before = downstream_error(inputs, targets, offsets, projection, bias, rectified=True)
    energy = max(float(np.sum(np.square(np.maximum(targets, 0.0)))), 1e-30)
    new_projection, new_bias = downstream_fit(inputs, targets, offsets, rectified=True)
    after = downstream_error(inputs, targets, offsets, new_projection, new_bias, rectified=True)
    applied = after < before
    if applied:
        dtype = weights.get(node, 1).dtype
        _write(weights, node, pruned, new_projection.astype(dtype), new_bias.astype(dtype))
    return {
        "mode": "weights+bias" if applied else "kept (refit was not better)",
        "fit": "rectified",
        "features": inputs.shape[1],
        "rows": len(inputs),
        "rel_error_before": round(float(np.sqrt(before / energy)), 6),
        "rel_error_after": round(float(np.sqrt(min(after, before) / energy)), 6),
    }


def _sizes(node: onnx.NodeProto, weight: np.ndarray) -> tuple[int, int]:
    """(input features, outputs) of the consumer as a linear map."""
    if node.op_type == "Conv":
        return int(np.prod(weight.shape[1:])), weight.shape[0]
    if node.op_type == "Gemm" and graph.node_attributes(node).get("transB", 0):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight.shape[1]


class _BiasShift:
    """Mean of (original − current) outputs: the best bias change with the weights fixed."""

    def __init__(self, n: int):
        self.count, self.sum, self.square = 0, np.zeros(n), 0.0

    def add(self, targets: np.ndarray, current: np.ndarray) -> None:
        diff = targets.astype(np.float64) - current.astype(np.float64)
        self.count += len(diff)
        self.sum += diff.sum(axis=0)
        self.square += float(np.square(diff).sum())


def _apply_bias_shift(weights, node, shift: _BiasShift, features, max_features) -> dict:
    delta = shift.sum / max(shift.count, 1)
    before = shift.square
    after = before - shift.count * float(delta @ delta)
    bias = weights.get(node, 2)
    base = np.zeros(delta.size) if bias is None else bias.astype(np.float64)
    dtype = weights.get(node, 1).dtype if bias is None else bias.dtype
    applied = after < before
    if applied:
        weights.set(node, 2, (base + delta).astype(dtype))
    scale = max(before, 1e-30)
    return {
        "mode": "bias only" if applied else "kept (refit was not better)",
        "reason": f"{features} input features > max_features {max_features}: weights kept",
        "rows": shift.count,
        "error_ratio_after": round(float(np.sqrt(min(after, before) / scale)), 6),
    }


def _bias_add(model: onnx.ModelProto, node: onnx.NodeProto, constants: dict):
    """(Add node, index of its constant input) if the MatMul's only user adds one bias value
    per output (a [n] or [1, …, 1, n] constant); None otherwise."""
    users = graph.consumers(model).get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    outputs = constants[node.input[1]].shape[-1]
    for index, name in enumerate(users[0].input):
        value = constants.get(name)
        if value is not None and value.ndim >= 1 and value.shape[-1] == outputs:
            if all(d == 1 for d in value.shape[:-1]):
                return users[0], index
    return None


def _current(weights: ConstantEditor, node, model) -> tuple[np.ndarray, np.ndarray]:
    """The consumer as P (n × k) and b (n,), the accumulator's convention."""
    weight = weights.get(node, 1).astype(np.float64)
    if node.op_type == "Conv":
        bias = weights.get(node, 2)
        bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        return weight_as_features(node, weight).T, bias
    if node.op_type == "Gemm":
        attrs = graph.node_attributes(node)
        projection = (weight if attrs.get("transB", 0) else weight.T) * attrs.get("alpha", 1.0)
        c = weights.get(node, 2)
        n = projection.shape[0]
        bias = np.zeros(n) if c is None else np.broadcast_to(c.astype(np.float64).reshape(-1), (n,))
        return projection, bias * attrs.get("beta", 1.0)
    add, index = _bias_add(model, node, weights.values)
    return weight.T, weights.get(add, index).astype(np.float64).reshape(-1)


def _write(weights: ConstantEditor, node, model, projection, bias) -> None:
    old = weights.get(node, 1)
    if node.op_type == "Conv":
        n, c, kh, kw = old.shape
        weight = projection.reshape(n, kh, kw, c).transpose(0, 3, 1, 2)
        weights.set(node, 1, np.ascontiguousarray(weight).astype(old.dtype))
        weights.set(node, 2, bias.astype(old.dtype))
        return
    if node.op_type == "Gemm":
        attrs = graph.node_attributes(node)
        matrix = projection / attrs.get("alpha", 1.0)
        weights.set(node, 1, (matrix if attrs.get("transB", 0) else matrix.T).astype(old.dtype))
        c = weights.get(node, 2)
        shape = (bias.size,) if c is None or c.ndim < 1 else c.shape[:-1] + (bias.size,)
        weights.set(node, 2, (bias / attrs.get("beta", 1.0)).reshape(shape).astype(old.dtype))
        return
    add, index = _bias_add(model, node, weights.values)
    weights.set(node, 1, projection.T.astype(old.dtype))
    current = weights.get(add, index)
    weights.set(add, index, bias.reshape(current.shape).astype(current.dtype))
