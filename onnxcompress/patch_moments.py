"""Second moments of each layer's input rows on the calibration data — a conv's kh×kw patches
ordered as its weight's (c, kh, kw), a linear layer's features — and, for the layers asked,
a sample of the rows themselves: what the lrs data solvers fit on."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxcompress.activation_scale import activation_of
from onnxcompress.layers import ConvLayer
from onnxcompress.linear_layers import LinearLayer
from onnxcompress.maths.patches import conv_patches
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import capture
from onnxcompress.token_rows import token_rows

# Patch rows sampled per layer for the input second moments (spread over the batches).
MAX_ROWS = 16384
ADMM_ROWS = 2048  # input rows a ReLU-fed layer keeps for lrs's ADMM solver


def input_moments(
    model: onnx.ModelProto, layers: list, context: PassContext, keep_rows: list[str] = ()
) -> tuple[dict, dict]:
    """E[x xᵀ] of each layer's input rows (conv: kh×kw patches ordered as the weight's
    (c, kh, kw); linear: features) on the calibration data, from at most MAX_ROWS rows a
    layer sampled evenly over the batches (seeded), in one onnxruntime pass; and for the
    layers named in `keep_rows`, up to ADMM_ROWS of those rows themselves (float32)."""
    names = sorted({activation_of(layer) for layer in layers})
    rng = np.random.default_rng(context.seed)
    batches = context.calibration or []
    per_batch = math.ceil(MAX_ROWS / max(1, len(batches)))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in keep_rows}
    per_batch_kept = math.ceil(ADMM_ROWS / max(1, len(batches)))
    for batch, values in capture(model, names, batches, context.threads):
        for layer in layers:
            rows = _input_rows(layer, values[activation_of(layer)], batch)
            if len(rows) > per_batch:
                rows = rows[rng.choice(len(rows), per_batch, replace=False)]
            if layer.name in kept:
                kept[layer.name].append(rows[:per_batch_kept].astype(np.float32))
            rows = rows.astype(np.float64)
            sums[layer.name] = sums.get(layer.name, 0) + rows.T @ rows
            counts[layer.name] = counts.get(layer.name, 0) + len(rows)
    moments = {name: total / max(1, counts[name]) for name, total in sums.items()}
    return moments, {name: np.concatenate(parts) for name, parts in kept.items() if parts}


def _input_rows(layer: ConvLayer | LinearLayer, x: np.ndarray, batch: dict) -> np.ndarray:
    if isinstance(layer, LinearLayer):  # x @ W only (lrs skips the others): features last
        return token_rows(batch, x)  # without padding positions when the batch has a mask
    geometry = {"strides": layer.strides, "pads": layer.pads, "dilations": layer.dilations}
    patches = conv_patches(x, layer.kernel, geometry)
    return np.moveaxis(patches, 1, -1).reshape(-1, patches.shape[1])
