"""Residual blocks whose shortcut is the identity, and the model without some of them.

Such a block computes Add(x, branch(x)), then often Relu, where x is a Relu's output already
(Relu(x) = x): without its branch it is x itself, so the block can go whole. What comes after
sees different activations; `refit_after` refits the convs there to their outputs in the
original (least squares on calibration data, in graph order, as the factorization passes
refit). `passes/blocks.py` removes blocks; `benchmarks/experiments/block_drop.py` measures each."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress import graph, layers, linear_layers
from onnxcompress.analyse import analyse
from onnxcompress.auto import sensitivity as sensitivity
from onnxcompress.layer_refit import RefitSite, refit_layers
from onnxcompress.passkit import PassContext, sample_count, track

# What a branch may hold: ops whose first input is the activation (Clip: Relu6).
BRANCH_OPS = ("Conv", "BatchNormalization", "Relu", "Clip")
MAX_BRANCH = 12  # nodes on a block's branch, walking back from the Add
# A linear layer is refit only with this many calibration rows per unknown of an output (its
# input features and bias): a classifier has one row per sample, and a fit with about as many
# unknowns as rows matches the calibration outputs it is checked on and little else.
ROWS_PER_UNKNOWN = 4


@dataclass(frozen=True)
class Block:
    add: str  # the Add node's name
    input: str  # x: the shortcut, the block's input
    output: str  # what later nodes read: the Relu after the Add when x is a Relu's, else the Add


def identity_blocks(model: onnx.ModelProto) -> list[Block]:
    """The blocks of `model` whose shortcut is the identity, in graph order: an Add of x and a
    branch of `BRANCH_OPS` nodes that starts from x."""
    made_by = graph.producers(model)
    read_by = graph.consumers(model)
    blocks = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for x, branch in (node.input, reversed(node.input)):
            if _branch_starts_at(made_by, branch, x):
                blocks.append(Block(node.name, x, _block_output(node, x, made_by, read_by)))
                break
    return blocks


def _branch_starts_at(made_by: dict, tensor: str, start: str) -> bool:
    for _ in range(MAX_BRANCH):
        node = made_by.get(tensor)
        if node is None or node.op_type not in BRANCH_OPS:
            return False
        tensor = node.input[0]
        if tensor == start:
            return True
    return False


def _block_output(add, x: str, made_by: dict, read_by: dict) -> str:
    """The Relu after the Add when x is itself a Relu's output (Relu(x) = x): it goes too."""
    after = read_by.get(add.output[0], [])
    x_is_relu = made_by.get(x) is not None and made_by[x].op_type == "Relu"
    if x_is_relu and len(after) == 1 and after[0].op_type == "Relu":
        return after[0].output[0]
    return add.output[0]


def without_blocks(model: onnx.ModelProto, blocks: list[Block]) -> onnx.ModelProto:
    """`model` with the branches of `blocks` removed: what read a block's output reads its
    input. Later blocks first, so that a block reading a removed one's output ends on the
    input of the first one removed."""
    order = {node.name: i for i, node in enumerate(model.graph.node)}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    outputs = {o.name for o in result.graph.output}
    for block in sorted(blocks, key=lambda b: order[b.add], reverse=True):
        if block.output in outputs:
            raise ValueError(f"block {block.add}: its output is a graph output")
        for node in result.graph.node:
            node.input[:] = [block.input if n == block.output else n for n in node.input]
    return graph.cleanup_and_sort(result)


def removed_nodes(model: onnx.ModelProto, blocks: list[Block]) -> list[onnx.NodeProto]:
    """The nodes of `model` that removing `blocks` takes away (their branches, Adds and the
    Relus after them)."""
    left = {node.name for node in without_blocks(model, blocks).graph.node}
    return [node for node in model.graph.node if node.name not in left]


def refit_after(
    original: onnx.ModelProto, dropped: onnx.ModelProto, context: PassContext
) -> tuple[onnx.ModelProto, dict]:
    """`dropped` with every conv and linear layer that reads a changed activation refit to its
    output in the original (those with a constant bias; each fed `dropped`'s own activations),
    and the refit's summary ({"layers": 0} without calibration data or such layers). The
    classifier after the last block is such a layer: refit, it absorbs much of that block's
    removal."""
    kept = {node.name for node in dropped.graph.node}
    first_change = next(
        (i for i, node in enumerate(original.graph.node) if node.name not in kept),
        len(original.graph.node),
    )
    later = {node.name for node in original.graph.node[first_change:]}
    analysis = analyse(dropped, context.input_shapes)
    own = _read_once(dropped)
    convs, _ = layers.conv_layers(dropped, analysis)
    sites = [_conv_site(c) for c in convs if c.node.name in later and _refittable(c, own)]
    linears, _ = linear_layers.linear_layers(dropped, analysis)
    fixed = own - {inp.name for inp in dropped.graph.input}
    samples = sample_count(context.calibration)
    linear_sites = [
        _linear_site(layer, fixed)
        for layer in linears
        if layer.node.name in later and _enough_rows(layer, samples)
    ]
    sites += [site for site in linear_sites if site is not None]
    result = onnx.ModelProto()
    result.CopyFrom(dropped)
    if not sites or not context.calibration:
        return result, {"layers": 0}
    return result, refit_layers(original, result, sites, context)


def damage_alone(
    model: onnx.ModelProto,
    blocks: list[Block],
    context: PassContext,
    sample: list[dict[str, np.ndarray]] | None,
    refit: bool = True,
) -> dict[str, float]:
    """Per block (by its Add's name): the outputs' relative L2 on the calibration data with
    that block alone removed and, with `refit`, the layers after it refit on `sample`."""
    reference = sensitivity.run_outputs(model, context)
    on_sample = PassContext(
        context.input_shapes, calibration=sample, seed=context.seed, threads=context.threads
    )
    damage = {}
    for block in track(context.progress, "ranking blocks", blocks):
        dropped = without_blocks(model, [block])
        if refit:
            dropped, _ = refit_after(model, dropped, on_sample)
        squared, _ = sensitivity.output_damage(reference, sensitivity.run_outputs(dropped, context))
        damage[block.add] = round(float(np.sqrt(squared)), 6)
    return damage


def _refittable(layer: layers.ConvLayer, own: set[str]) -> bool:
    """A 2-D conv with a bias and one group: its weight maps the input's whole kh×kw patches
    (grouped and depthwise convs would need one fit per group); weight and bias initializers
    only it reads (a refit rewrites them)."""
    stored = all(name in own for name in layer.node.input[1:3])
    plain = layer.group == 1 and layer.weight.ndim == 4
    return layer.bias is not None and plain and stored


def _conv_site(layer: layers.ConvLayer) -> RefitSite:
    # The layer's pads are resolved (auto_pad too): the refit's patches need them.
    geometry = {key: list(getattr(layer, key)) for key in ("strides", "pads", "dilations")}
    inputs = layer.node.input
    return RefitSite(inputs[0], layer.node.output[0], inputs[1], inputs[2], "conv", conv=geometry)


def _read_once(model: onnx.ModelProto) -> set[str]:
    """Initializers read by one node: a refit of that node may rewrite them. (Linear layers
    also want them not listed as graph inputs, which a caller could feed.)"""
    readers = graph.consumers(model)
    return {i.name for i in model.graph.initializer if len(readers[i.name]) == 1}


def _enough_rows(layer: linear_layers.LinearLayer, samples: int) -> bool:
    rows = samples * math.prod(layer.output_shape[1:-1])  # tokens per sample, if any
    return rows >= ROWS_PER_UNKNOWN * (layer.in_features + 1)


def _linear_site(layer: linear_layers.LinearLayer, fixed: set[str]) -> RefitSite | None:
    """A right-side Gemm (alpha = beta = 1, no transA, a per-column bias C) or MatMul + bias
    Add, whose weight and bias initializers only it reads; None for any other."""
    node, attrs = layer.node, graph.node_attributes(layer.node)
    if layer.side != "right" or node.input[1] not in fixed:
        return None
    if layer.op == "MatMul":  # a bias_add's bias is already an initializer only it reads
        bias = layer.bias_add
        if bias is None:
            return None
        return RefitSite(layer.activation, bias.output, node.input[1], bias.bias, "matmul")
    plain = all(float(attrs.get(key, 1.0)) == 1.0 for key in ("alpha", "beta"))
    if not plain or layer.trans or len(node.input) < 3 or node.input[2] not in fixed:
        return None
    if layer.bias is None or layer.c.size != layer.out_features:
        return None
    kind = "matmul_t" if int(attrs.get("transB", 0)) else "matmul"
    return RefitSite(layer.activation, node.output[0], node.input[1], node.input[2], kind)
