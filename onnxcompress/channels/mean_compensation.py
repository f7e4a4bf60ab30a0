"""Mean compensation for consumers that are not refit: what a removed input channel fed a
consumer on average, Σ over kernel taps of W[:, c, tap] · E[x_c at that tap] (the mean over
the input positions the tap reads, zero padding included), goes into the consumer's bias, so
its output mean on the calibration data stays the original's. A least-squares refit with
intercept already does this, so it serves the consumers the refit does not take (refit off,
grouped Conv, ConvTranspose, …)."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.channels.activations import conv_output_size, prepared_input
from onnxcompress.channels.groups import ChannelGraph, label
from onnxcompress.channels.surgery import ConstantEditor
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import capture


def removed_mean_shift(columns: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The bias change that keeps an output's mean: Σ over removed inputs f and taps t of
    W[:, f, t]·E[x_f at t]; `columns` is (outputs × removed features × taps), `means`
    (removed features × taps)."""
    w = np.asarray(columns, dtype=np.float64)
    return np.einsum("nft,ft->n", w, np.asarray(means, dtype=np.float64))


def compensate_means(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    channel_graph: ChannelGraph,
    keep: dict[int, np.ndarray],
    context: PassContext,
    skip: set[str] = frozenset(),
) -> dict[str, dict]:
    """Shift, in place in `pruned`, the bias of every consumer that lost input channels (except
    those named in `skip`) by the removed channels' mean contribution; returns per consumer
    what was done."""
    constants = graph.constant_tensors(original)
    edits = [
        e
        for e in channel_graph.edits
        if e.kind == "consumer"
        and channel_graph.touches(e, keep)
        and label(original.graph.node[e.node]) not in skip
    ]
    if not edits:
        return {}
    kept_out = {
        e.node: channel_graph.positions(e.layout, keep)
        for e in channel_graph.edits
        if e.kind == "producer" and channel_graph.touches(e, keep)
    }
    nodes = [original.graph.node[e.node] for e in edits]
    # Only consumers with a mean-shift form are measured (a 1-D conv's input has no 2-D taps).
    nodes = [n for n in nodes if _input_columns(n, constants[n.input[1]]) is not None]
    means = _tap_means(original, nodes, constants, context) if nodes else {}
    editor = ConstantEditor(pruned)
    done = {}
    for edit in edits:
        node = original.graph.node[edit.node]
        columns = _input_columns(node, constants[node.input[1]])
        if columns is None:
            done[label(node)] = {
                "mode": "none",
                "reason": f"{_kind(node, constants)}: no mean shift",
            }
            continue
        kept = channel_graph.positions(edit.layout, keep)
        removed = np.setdiff1d(np.arange(columns.shape[1]), kept)
        shift = removed_mean_shift(columns[:, removed], means[node.name or node.output[0]][removed])
        if edit.node in kept_out:  # the consumer also lost output channels
            shift = shift[kept_out[edit.node]]
        _add_to_bias(editor, pruned.graph.node[edit.node], shift)
        done[label(node)] = {"mode": "mean shift", "removed_inputs": int(removed.size)}
    return done


def _kind(node: onnx.NodeProto, constants: dict) -> str:
    """What the consumer is, in the words of a reason: "1-D Conv", "grouped Conv", "MatMul"."""
    if node.op_type != "Conv":
        return node.op_type
    if int(graph.node_attributes(node).get("group", 1)) != 1:
        return "grouped Conv"
    return f"{constants[node.input[1]].ndim - 2}-D Conv"


def _tap_means(model, nodes: list[onnx.NodeProto], constants: dict, context: PassContext) -> dict:
    """Per consumer: the mean of each input feature at each kernel tap (features × taps)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    names = list(dict.fromkeys(n.input[0] for n in nodes))
    for _, values in capture(model, names, context.calibration or [], context.threads):
        for node in nodes:
            key = node.name or node.output[0]
            total, count = _tap_sums(node, values[node.input[0]], constants[node.input[1]].shape)
            sums[key] = sums.get(key, 0.0) + total
            counts[key] = counts.get(key, 0) + count
    return {key: sums[key] / max(counts[key], 1) for key in sums}


def _tap_sums(node: onnx.NodeProto, x: np.ndarray, weight_shape) -> tuple[np.ndarray, int]:
    """Σ of the input each tap reads over all output positions (Conv), or per feature."""
    source = prepared_input(node, x)  # Conv: padded, channel-last
    if node.op_type != "Conv":
        return source.astype(np.float64).sum(axis=0)[:, None], source.shape[0]
    attrs = graph.node_attributes(node)
    height, width = conv_output_size(node, x.shape, weight_shape)
    (sh, sw), (dh, dw) = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    taps = []
    for i in range(weight_shape[2]):
        for j in range(weight_shape[3]):
            window = source[:, i * dh : i * dh + sh * (height - 1) + 1 : sh,
                            j * dw : j * dw + sw * (width - 1) + 1 : sw]  # fmt: skip
            taps.append(window.astype(np.float64).sum(axis=(0, 1, 2)))
    return np.stack(taps, axis=1), x.shape[0] * height * width


def _input_columns(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray | None:
    """The consumer's weights as (outputs × input features × taps); None if it has no such
    form here (grouped or non-2-D Conv, ConvTranspose, MatMul)."""
    attrs = graph.node_attributes(node)
    w = weight.astype(np.float64)
    if node.op_type == "Conv" and int(attrs.get("group", 1)) == 1 and w.ndim == 4:
        return w.reshape(w.shape[0], w.shape[1], -1)
    if node.op_type == "Gemm" and not attrs.get("transA", 0):
        matrix = w if attrs.get("transB", 0) else w.T
        return (matrix * attrs.get("alpha", 1.0) / attrs.get("beta", 1.0))[:, :, None]
    return None


def _add_to_bias(editor: ConstantEditor, node: onnx.NodeProto, shift: np.ndarray) -> None:
    bias = editor.get(node, 2)
    dtype = editor.get(node, 1).dtype
    if bias is None:
        editor.set(node, 2, shift.astype(dtype))
        return
    flat = bias.astype(np.float64).reshape(-1)
    new = np.broadcast_to(flat, shift.shape) + shift
    editor.set(node, 2, new.reshape(bias.shape[:-1] + shift.shape).astype(bias.dtype))
