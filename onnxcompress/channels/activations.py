"""Capturing activations for channel scoring and refit: expose tensors as outputs, cut the model
down to what computes them, and turn a consumer's input into rows of features (im2col patches
for a Conv, in kh·kw·C order) at a seeded sample of its output positions."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcompress import graph

TOTAL_ROWS = 16384  # rows (output positions) sampled per consumer over all batches


def prefix(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of `model` that computes `outputs` (and only that), with them as outputs."""
    needed, nodes = set(outputs), []
    for node in reversed(model.graph.node):
        if any(out in needed for out in node.output):
            nodes.append(node)
            needed.update(name for name in node.input if name)
            needed |= graph.subgraph_names(node)
    part = onnx.ModelProto()
    part.ir_version = model.ir_version
    part.opset_import.extend(model.opset_import)
    g = part.graph
    g.name = model.graph.name
    g.node.extend(reversed(nodes))
    g.input.extend(i for i in model.graph.input if i.name in needed)
    g.initializer.extend(t for t in model.graph.initializer if t.name in needed)
    g.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    return part


def rows_per_batch(batches: int) -> int:
    return max(64, TOTAL_ROWS // max(batches, 1))


def output_rows(node: onnx.NodeProto, output_shape) -> tuple:
    """Index arrays locating every output row of a consumer: (batch, row, col) for a 2-D Conv,
    (flat row,) for Gemm/MatMul (rows of the input as a matrix)."""
    if node.op_type == "Conv":
        n, _, height, width = output_shape
        return np.unravel_index(np.arange(n * height * width), (n, height, width))
    return (np.arange(int(np.prod(output_shape[:-1]))),)


def output_shape(node: onnx.NodeProto, input_shape, weight_shape) -> tuple[int, ...]:
    """A consumer's output shape from its input and weight shapes."""
    if node.op_type == "Conv":
        return (input_shape[0], weight_shape[0], *conv_output_size(node, input_shape, weight_shape))
    attrs = graph.node_attributes(node)
    if node.op_type == "Gemm":
        rows = input_shape[1] if attrs.get("transA", 0) else input_shape[0]
        return rows, weight_shape[0] if attrs.get("transB", 0) else weight_shape[1]
    return (*input_shape[:-1], weight_shape[1])


def sample_rows(rows: tuple, limit: int, rng: np.random.Generator) -> tuple:
    count = len(rows[0])
    if count <= limit:
        return rows
    picks = np.sort(rng.choice(count, limit, replace=False))
    return tuple(r[picks] for r in rows)


def conv_output_size(node: onnx.NodeProto, input_shape, weight_shape) -> tuple[int, int]:
    attrs = graph.node_attributes(node)
    kh, kw = weight_shape[2:]
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    height = (input_shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    width = (input_shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    return height, width


def prepared_input(node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    """A Conv's input padded and channel-last (patches then gather contiguous channels); a
    Gemm/MatMul's input as rows × features."""
    attrs = graph.node_attributes(node)
    if node.op_type == "Conv":
        top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
        padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        return np.ascontiguousarray(padded.transpose(0, 2, 3, 1))
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        x = x.T
    return x.reshape(-1, x.shape[-1])


def input_features(node: onnx.NodeProto, source: np.ndarray, rows: tuple, kernel) -> np.ndarray:
    """The consumer's input features at `rows` (Conv: im2col patches in kh·kw·C order)."""
    if node.op_type != "Conv":
        return source[rows[0]]
    attrs = graph.node_attributes(node)
    n_idx, oy, ox = rows
    kh, kw = kernel
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    ys = oy[:, None] * sh + np.arange(kh) * dh  # [R, kh]
    xs = ox[:, None] * sw + np.arange(kw) * dw  # [R, kw]
    patches = source[n_idx[:, None, None], ys[:, :, None], xs[:, None, :]]  # [R, kh, kw, C]
    return patches.reshape(len(n_idx), -1)


def output_table(node: onnx.NodeProto, y: np.ndarray, rows: tuple) -> np.ndarray:
    """A consumer's output values at `rows`, as rows × channels."""
    if node.op_type == "Conv":
        return y.transpose(0, 2, 3, 1)[rows]
    return y.reshape(-1, y.shape[-1])[rows[0]]


def weight_as_features(node: onnx.NodeProto, weight: np.ndarray, alpha: float = 1.0):
    """The consumer's weight as B (features × outputs) in the feature order of
    `input_features` (Conv: kh·kw·C)."""
    w = weight.astype(np.float64)
    if node.op_type == "Conv":
        return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    if node.op_type == "Gemm":
        return (w.T if graph.node_attributes(node).get("transB", 0) else w) * alpha
    return w
