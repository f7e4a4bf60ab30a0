"""Scores for every channel of every group, from the weights or from calibration data.

The maths is in `channel_importance`; this module finds the weights and activations each group
needs: its producers' output weights (scaled by a BatchNormalization right after them), or the
inputs of its consumers, captured with onnxruntime batch by batch: per-channel moments, or for
the refit-aware order the covariance of each consumer's input features.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.channels.activations import (
    input_features,
    output_rows,
    output_shape,
    prepared_input,
    rows_per_batch,
    sample_rows,
    weight_as_features,
)
from onnxcompress.channels.groups import ChannelGraph, Edit, label
from onnxcompress.channels.importance import (
    ChannelMoments,
    CovarianceAccumulator,
    column_energy,
    combine_scores,
    contribution_scores,
    normalised,
    weight_channel_norms,
)
from onnxcompress.channels.surgery import input_axis, output_axis
from onnxcompress.maths.channel_selection import LinearConsumer, elimination_order
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import capture


def weight_scores(
    model: onnx.ModelProto, channel_graph: ChannelGraph, groups: list[int], p: int = 2
) -> dict[int, np.ndarray]:
    """Per group: the Lp norms of each producer's output-channel weights, times the |scale| of
    a BatchNormalization that alone reads the producer's output, normalised and summed."""
    constants = graph.constant_tensors(model)
    users = graph.consumers(model)
    vectors: dict[int, list[np.ndarray]] = {g: [] for g in groups}
    for edit in _edits(channel_graph, "producer", groups):
        node = model.graph.node[edit.node]
        norms = weight_channel_norms(constants[node.input[1]], output_axis(node), p)
        scale = _batchnorm_scale(users.get(node.output[0], []), constants)
        if scale is not None and scale.size == norms.size:
            norms = norms * np.abs(scale)
        ((group, _),) = channel_graph.owners(edit.layout)
        vectors[group].append(norms)
    return {g: combine_scores(v) for g, v in vectors.items() if v}


def data_scores(
    model: onnx.ModelProto,
    channel_graph: ChannelGraph,
    groups: list[int],
    context: PassContext,
) -> dict[int, np.ndarray]:
    """Per group: each consumer's sqrt(E[x_c²]·‖W[:, c]‖²), what the channel adds to that
    consumer's output when nothing is refit, normalised per consumer and summed."""
    constants = graph.constant_tensors(model)
    edits = _edits(channel_graph, "consumer", groups)
    tensors = {model.graph.node[e.node].input[0]: e.layout for e in edits}
    moments = activation_moments(model, tensors, context)
    totals = {g: np.zeros(channel_graph.groups[g].channels) for g in groups}
    for edit in edits:
        node = model.graph.node[edit.node]
        stats = moments[node.input[0]]
        energy = stats.mean_square()
        conv_groups = int(graph.node_attributes(node).get("group", 1))
        columns = column_energy(constants[node.input[1]], input_axis(node), conv_groups)
        contribution = contribution_scores(energy, columns, edit.layout.repeat)
        offset = 0
        for group, channels in channel_graph.owners(edit.layout):
            values = contribution[offset : offset + channels.size]
            offset += channels.size
            if group in totals:
                totals[group][channels] += normalised(values)
    return totals


def activation_moments(
    model: onnx.ModelProto, tensors: dict[str, object], context: PassContext
) -> dict[str, ChannelMoments]:
    """Per-position moments of each tensor along its layout's channel axis (features after a
    flatten), over every calibration batch."""
    names = list(tensors)
    moments: dict[str, ChannelMoments] = {}
    for _, values in capture(model, names, context.calibration or [], context.threads):
        for name, value in values.items():
            layout = tensors[name]
            if name not in moments:
                moments[name] = ChannelMoments(value.shape[layout.axis])
            moments[name].add(value, layout.axis)
    return moments


def layer_weights(model: onnx.ModelProto, channel_graph: ChannelGraph, groups: list[int]):
    """(weight, tensor, node) of every layer whose channels `groups` tie: the weights that
    scoring, refit and surgery read (producers, consumers, depthwise convs in between)."""
    constants = graph.constant_tensors(model)
    kinds = ("producer", "consumer", "depthwise")
    nodes = {edit.node for kind in kinds for edit in _edits(channel_graph, kind, groups)}
    for index in sorted(nodes):
        node = model.graph.node[index]
        if len(node.input) > 1 and node.input[1] in constants:
            yield constants[node.input[1]], node.input[1], label(node)


def _edits(channel_graph: ChannelGraph, kind: str, groups: list[int]) -> list[Edit]:
    wanted = set(groups)
    return [
        e
        for e in channel_graph.edits
        if e.kind == kind and {channel_graph.group_of_space[s] for s in e.layout.spaces()} & wanted
    ]


def _batchnorm_scale(users: list[onnx.NodeProto], constants: dict) -> np.ndarray | None:
    if len(users) != 1 or users[0].op_type != "BatchNormalization":
        return None
    bn = users[0]
    params = [constants.get(name) for name in bn.input[1:5]]
    if any(p is None for p in params):
        return None
    gamma, _, _, var = (p.astype(np.float64) for p in params)
    epsilon = float(graph.node_attributes(bn).get("epsilon", 1e-5))
    return gamma / np.sqrt(var + epsilon)


def refit_aware_scores(
    model: onnx.ModelProto,
    channel_graph: ChannelGraph,
    groups: list[int],
    context: PassContext,
    max_features: int = 4608,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per group: scores from the refit-aware elimination order (a higher score is removed
    later) and the summed relative consumer error after removing 0, 1, … channels.

    Each consumer is a linear map of its input features (Conv: im2col patches) with their
    covariance measured on the original model; consumers with more than `max_features`
    features, grouped ones and ConvTranspose count channels as independent (a diagonal
    covariance of per-channel variances with the weight-column norms)."""
    constants = graph.constant_tensors(model)
    edits = _edits(channel_graph, "consumer", groups)
    full = {
        e.node: _full_covariance(model.graph.node[e.node], constants, max_features) for e in edits
    }
    stats = _consumer_statistics(model, edits, full, constants, context)
    systems: dict[int, list[LinearConsumer]] = {g: [] for g in groups}
    for edit in edits:
        node = model.graph.node[edit.node]
        weight = constants[node.input[1]]
        if full[edit.node]:
            covariance = stats[edit.node].covariance()
            coefficients = weight_as_features(node, weight)
            owned = _conv_features if node.op_type == "Conv" else _dense_features
        else:
            moments = stats[edit.node]
            conv_groups = int(graph.node_attributes(node).get("group", 1))
            columns = column_energy(weight, input_axis(node), conv_groups)
            per_position = columns.reshape(moments.sum.size, -1).sum(axis=1)
            covariance = np.diag(moments.variance() * moments.count)
            coefficients = np.sqrt(per_position)[:, None]
            owned = _dense_features
        offset = 0
        for group, channels in channel_graph.owners(edit.layout):
            if group in systems:
                features = {
                    int(c): owned(offset + k, edit.layout, weight) for k, c in enumerate(channels)
                }
                systems[group].append(LinearConsumer(covariance, coefficients, features))
            offset += channels.size
    scores, damage = {}, {}
    for g, consumers in systems.items():
        order, curve = elimination_order(consumers, channel_graph.groups[g].channels)
        scores[g] = np.empty(order.size)
        scores[g][order] = np.arange(order.size, dtype=np.float64)
        damage[g] = curve
    return scores, damage


def _full_covariance(node: onnx.NodeProto, constants: dict, max_features: int) -> bool:
    weight = constants[node.input[1]]
    if node.op_type == "Conv":
        attrs = graph.node_attributes(node)
        plain = int(attrs.get("group", 1)) == 1 and weight.ndim == 4
        same = attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")
        return plain and not same and int(np.prod(weight.shape[1:])) <= max_features
    if node.op_type == "Gemm":
        k = weight.shape[1] if graph.node_attributes(node).get("transB", 0) else weight.shape[0]
        return k <= max_features
    return node.op_type == "MatMul" and weight.shape[0] <= max_features


def _consumer_statistics(model, edits, full, constants, context) -> dict:
    """Per consumer: the covariance of its sampled input features, or per-position moments."""
    names = list(dict.fromkeys(model.graph.node[e.node].input[0] for e in edits))
    batches = context.calibration or []
    limit = rows_per_batch(len(batches))
    stats: dict[int, object] = {}
    captured = capture(model, names, batches, context.threads)
    for number, (_, values) in enumerate(captured):
        for edit in edits:
            node = model.graph.node[edit.node]
            x, weight = values[node.input[0]], constants[node.input[1]]
            if not full[edit.node]:
                stats.setdefault(edit.node, ChannelMoments(x.shape[edit.layout.axis]))
                stats[edit.node].add(x, edit.layout.axis)
                continue
            rng = np.random.default_rng([context.seed, edit.node, number])
            rows = sample_rows(
                output_rows(node, output_shape(node, x.shape, weight.shape)), limit, rng
            )
            features = input_features(node, prepared_input(node, x), rows, weight.shape[2:])
            stats.setdefault(edit.node, CovarianceAccumulator(features.shape[1]))
            stats[edit.node].add(features)
    return stats


def _conv_features(position: int, layout, weight: np.ndarray) -> np.ndarray:
    """Features of input channel `position` in kh·kw·C patch order."""
    kernel = int(np.prod(weight.shape[2:]))
    return np.arange(kernel) * layout.channels + position


def _dense_features(position: int, layout, weight: np.ndarray) -> np.ndarray:
    return position * layout.repeat + np.arange(layout.repeat)
