"""The low-rank + sparse rewrite of a layer (passes/lrs.py), W ≈ L + S: the layer's weight as
the solver's matrix, the MACs and parameters of the rewrite, and its nodes — the low-rank pair
through width r plus a sparse branch on the kept input channels (a `Gather`, then a smaller
dense Conv or product), summed by an `Add` that writes the layer's output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.factorization import Rewrite
from onnxcompress.layers import ConvLayer, Namer, conv_node, spatial_conv_node
from onnxcompress.linear_layers import LinearLayer, first_gemm_c, zero_c
from onnxcompress.maths.lowrank_sparse import column_groups


@dataclass
class Shape:
    """A layer as the solver sees it: W (n × d) on input rows of d, in column groups."""

    matrix: np.ndarray
    groups: np.ndarray  # input channel (feature) of each column
    channels: int
    per_position: int  # MACs of one output position per output channel and input channel


def layer_shape(layer: ConvLayer | LinearLayer) -> Shape:
    """The weight as the matrix acting on input rows: a conv's unfolded to n × (c·kh·kw),
    grouped by input channel; x @ W's as outputs × features."""
    if isinstance(layer, ConvLayer):
        n, c, kh, kw = layer.weight.shape
        groups = column_groups(c, kh * kw)
        return Shape(layer.weight.reshape(n, -1), groups, c, kh * kw)
    k = layer.in_features
    return Shape(layer.weight.T, np.arange(k), k, 1)


@dataclass
class Factors:
    """A chosen split: L = left @ right; S's columns on the kept input channels (all of them
    when `kept` is None: unstructured), in the layer's dtype."""

    left: np.ndarray  # n × r
    right: np.ndarray  # r × d
    sparse: np.ndarray  # n × (kept channels · kernel volume)
    kept: np.ndarray | None


def split_cost(layer, shape: Shape, rank: int, keep: int, structured: bool) -> dict[str, int]:
    """MACs (as `analyse` counts them: Gather 0, Add one per output element) and parameters
    of the rewrite; `keep` is kept channels (structured) or kept entries."""
    n, d = shape.matrix.shape
    positions = layer.macs // (n * d)  # output positions (× batch) of the original layer
    channels = keep if structured else shape.channels  # the sparse branch's input channels
    sparse = positions * n * channels * shape.per_position
    low = positions * rank * (d + n)
    add = positions * n if channels else 0
    params = rank * (d + n) + n * channels * shape.per_position
    if isinstance(layer, ConvLayer):
        params += n if layer.bias is not None else 0
    else:
        params += layer.c.size if layer.c is not None else 0
        # A zero C on each C-less Gemm ("low", and "sparse" when S keeps channels).
        params += (rank + (n if channels > 0 else 0)) if first_gemm_c(layer) else 0
    return {
        "macs": low + sparse + add,
        "params": params,
        "macs_low_rank": low,
        "macs_sparse": sparse,
    }


def conv_rewrite(layer: ConvLayer, fitted: Factors, namer: Namer) -> Rewrite:
    """kh×kw Conv (c → r, the layer's geometry), 1×1 Conv (r → n, the bias), plus the sparse
    branch with the layer's geometry on the kept channels, added into the layer's output."""
    n, c, kh, kw = layer.weight.shape
    dtype, kept = layer.weight.dtype, fitted.kept
    x, out, rank = layer.node.input[0], layer.node.output[0], fitted.right.shape[0]
    sparse = fitted.sparse.reshape(n, fitted.sparse.shape[1] // (kh * kw), kh, kw)
    has_sparse = sparse.shape[1] > 0
    first, inits = spatial_conv_node(
        namer,
        layer,
        f"{layer.name}.lrs_low",
        x,
        fitted.right.reshape(rank, c, kh, kw).astype(dtype),
    )
    bias = None if layer.bias is None else layer.bias.astype(dtype)
    second, more = conv_node(
        namer,
        f"{layer.name}.lrs_mix",
        first.output[0],
        fitted.left.reshape(n, rank, 1, 1).astype(dtype),
        out=None if has_sparse else out,
        bias=bias,
        kernel_shape=[1, 1],
    )
    nodes, inits = [first, second], inits + more
    if has_sparse:
        source = x
        if kept is not None and len(kept) < c:
            gather, index = _gather(namer, layer.name, x, kept, axis=1)
            nodes.append(gather)
            inits.append(index)
            source = gather.output[0]
        branch, more = spatial_conv_node(
            namer, layer, f"{layer.name}.lrs_sparse", source, sparse.astype(dtype)
        )
        nodes += [branch, _add(namer, layer.name, second.output[0], branch.output[0], out)]
        inits += more
    return Rewrite(nodes, inits, None)


def linear_rewrite(layer: LinearLayer, fitted: Factors, namer: Namer) -> Rewrite:
    """x @ Bᵀ @ Aᵀ (+ C on a Gemm's second product) + x[..., kept] @ S[:, kept]ᵀ."""
    dtype, kept = layer.weight.dtype, fitted.kept
    x, out = layer.activation, layer.node.output[0]
    sparse = fitted.sparse
    has_sparse = sparse.shape[1] > 0
    inits: list[onnx.TensorProto] = []

    def constant(label: str, value: np.ndarray) -> str:
        name = namer(f"{layer.name}.lrs_{label}")
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype), name))
        return name

    def product(label: str, inputs: list[str], result: str | None = None) -> onnx.NodeProto:
        name = namer(f"{layer.name}.lrs_{label}")
        return helper.make_node(layer.op, inputs, [result or f"{name}.out"], name=name)

    low_c = zero_c(layer, constant, fitted.right.shape[0])
    first = product("low", [x, constant("low_weight", fitted.right.T), *low_c])
    second_inputs = [first.output[0], constant("mix_weight", fitted.left.T)]
    if layer.c is not None:
        second_inputs.append(constant("c", layer.c))
    second = product("mix", second_inputs, None if has_sparse else out)
    nodes = [first, second]
    if has_sparse:
        source = x
        if kept is not None and len(kept) < layer.in_features:
            gather, index = _gather(namer, layer.name, x, kept, axis=len(layer.input_shape) - 1)
            nodes.append(gather)
            inits.append(index)
            source = gather.output[0]
        weight = constant("sparse_weight", sparse.T)
        branch = product("sparse", [source, weight, *zero_c(layer, constant, sparse.shape[0])])
        nodes += [branch, _add(namer, layer.name, second.output[0], branch.output[0], out)]
    return Rewrite(nodes, inits, None)


def _gather(namer: Namer, base: str, x: str, kept: np.ndarray, axis: int):
    index = numpy_helper.from_array(kept.astype(np.int64), namer(f"{base}.lrs_kept"))
    name = namer(f"{base}.lrs_gather")
    node = helper.make_node("Gather", [x, index.name], [f"{name}.out"], name=name, axis=axis)
    return node, index


def _add(namer: Namer, base: str, a: str, b: str, out: str) -> onnx.NodeProto:
    return helper.make_node("Add", [a, b], [out], name=namer(f"{base}.lrs_add"))
