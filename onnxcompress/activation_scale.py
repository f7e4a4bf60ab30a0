"""Activation-aware factorization: with calibration data, a layer's weight is factorized in
the coordinates where its input is white. With C = E[x xᵀ] the second moment of the layer's
input channels on the calibration data and T its Cholesky factor (C = T Tᵀ), the method
factorizes W·T, and the factor that reads the input is multiplied by T⁻¹ afterwards. The
subgraph keeps its shape, but ‖(W − Ŵ)·T‖ is now the layer's output error on that data
(up to correlations inside a kernel window), so ranks go where the data needs them and are
allocated across layers by that error instead of weight error (SVD-LLM, Wang et al. 2024;
with the diagonal of C only, ASVD, Yuan et al. 2023). Methods whose input factor is a
grouped conv (fga) can only absorb a diagonal T. Any input transform keeps exact structure
(rank per group, Tucker and CP ranks) exact."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress.layers import ConvLayer
from onnxcompress.linear_layers import LinearLayer
from onnxcompress.maths.whitening import RIDGE, whitening  # noqa: F401  (re-exported)
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import capture
from onnxcompress.token_rows import token_rows


def activation_of(layer: ConvLayer | LinearLayer) -> str:
    return layer.activation if isinstance(layer, LinearLayer) else layer.node.input[0]


def feature_axis(layer: ConvLayer | LinearLayer) -> int:
    """The axis of the layer's input tensor that the weight's input dimension contracts."""
    if isinstance(layer, ConvLayer):
        return 1
    if layer.side == "right":
        return 0 if layer.trans else -1  # Gemm transA: the activation is K × M
    return -1 if layer.trans else -2  # left side: W @ x, x is (…, K, N) or (N, K) with transB


def input_second_moments(
    model: onnx.ModelProto, layers: list, context: PassContext
) -> dict[str, np.ndarray]:
    """E[x xᵀ] over the input channels of each layer on the calibration batches (original
    model), one pass over the data for all layers."""
    names = sorted({activation_of(layer) for layer in layers})
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch, values in capture(model, names, context.calibration or [], context.threads):
        for layer in layers:
            x = _channel_columns(batch, values[activation_of(layer)], feature_axis(layer))
            sums[layer.name] = sums.get(layer.name, 0) + x @ x.T
            counts[layer.name] = counts.get(layer.name, 0) + x.shape[1]
    return {name: total / max(1, counts[name]) for name, total in sums.items()}


def _channel_columns(batch: dict[str, np.ndarray], value: np.ndarray, axis: int) -> np.ndarray:
    """The activation as channels × samples (float64); for features-last token activations,
    padding positions are left out (their values are meaningless)."""
    if axis in (-1, value.ndim - 1):
        return token_rows(batch, value).T.astype(np.float64)
    x = np.moveaxis(value, axis, 0)
    return x.reshape(x.shape[0], -1).astype(np.float64)


def transformed_layer(layer: ConvLayer | LinearLayer, transform: np.ndarray) -> Any:
    """A copy of the layer whose weight reads white inputs z (x = T z): W·T on the input axis."""
    w = layer.weight.astype(np.float64)
    if isinstance(layer, ConvLayer):
        if layer.group != 1:
            return layer  # grouped layers are skipped by every method; leave them as they are
        new = np.einsum("nc...,cd->nd...", w, transform)
    elif layer.side == "right":
        new = transform.T @ w  # y = x W with x = z Tᵀ
    else:
        new = w @ transform
    return dataclasses.replace(layer, weight=new.astype(layer.weight.dtype))


def restore_inputs(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    x: str,
    transform: np.ndarray,
) -> None:
    """Give the rewrite's nodes that read `x` weights for x instead of z, in place: F = F'·T⁻¹,
    so the subgraph computes Ŵ = (Ŵ·T)·T⁻¹ on the real input."""
    inverse = np.linalg.inv(transform)
    by_name = {init.name: init for init in initializers}
    for node in nodes:
        if x not in node.input:
            continue
        init = by_name[node.input[1] if node.input[0] == x else node.input[0]]
        weight = numpy_helper.to_array(init)
        restored = _apply_inverse(node, x, weight.astype(np.float64), inverse)
        init.CopyFrom(numpy_helper.from_array(restored.astype(weight.dtype), init.name))


def _apply_inverse(node: onnx.NodeProto, x: str, weight: np.ndarray, inverse: np.ndarray):
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv" and node.input[0] == x:
        group = int(attrs.get("group", 1))
        if group == 1:
            return np.einsum("nd...,dc->nc...", weight, inverse)
        if np.count_nonzero(inverse - np.diag(np.diag(inverse))):
            raise RuntimeError(f"{node.name}: a grouped conv can only absorb a diagonal transform")
        scales = np.diag(inverse).reshape(group, -1)
        per_output = np.repeat(scales, weight.shape[0] // group, axis=0)
        return weight * per_output.reshape(per_output.shape + (1,) * (weight.ndim - 2))
    if node.op_type in ("MatMul", "Gemm"):
        if node.input[0] == x and not attrs.get("transB", 0):
            return inverse.T @ weight  # x @ A: A = T⁻ᵀ A'
        if node.input[1] == x and not attrs.get("transA", 0):
            return weight @ inverse  # B @ x: B = B' T⁻¹
    raise RuntimeError(f"activation-aware rewrite: cannot restore {node.op_type} {node.name}")
