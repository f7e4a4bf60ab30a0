"""Calibration refit (methods.md, top): after a layer is factorized, refit its last linear
factor and bias by least squares so the layer's outputs match the original layer's outputs
on calibration data. Layers go in graph order, each fed the *compressed* model's own
activations so errors do not pile up. Activations come from onnxruntime: both models run
forward once, segment by segment, keeping every batch's live tensors up to
`refit_stream.LIVE_BYTES`; past it, a layer's tensors are exposed as graph outputs of each
model cut from its inputs, one batch at a time (`pair_reader`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress import relu_refit
from onnxcompress.holdout import row_samples
from onnxcompress.low_rank_refit import FirstFactor, fit_both_factors
from onnxcompress.maths.least_squares import LeastSquaresAccumulator
from onnxcompress.maths.patches import conv_patches
from onnxcompress.passkit import PassContext, sample_count, track
from onnxcompress.refit_stream import Exhausted, RefitStream
from onnxcompress.token_rows import token_row_mask

log = logging.getLogger(__name__)

# (tensor of the original, tensor of the rewritten model) -> (batch, original's, rewritten's)
PairReader = Callable[[str, str], Iterator[tuple[dict, np.ndarray, np.ndarray]]]


@dataclass
class RefitSite:
    """Where a rewritten layer's last linear factor sits.

    kind "conv1x1": weight (n, k, 1, 1), channels on axis 1 of `input`/`output`;
    kind "conv": weight (n, k, kh, kw) of a Conv with the geometry in `conv` (strides, pads,
    dilations); its rows are the input's kh×kw patches (im2col);
    kind "matmul": weight (k, n), features on the last axis (x @ W);
    kind "matmul_t": weight (n, k) read transposed (a Gemm with transB=1: x @ Wᵀ).
    """

    input: str  # tensor fed to the last factor (rewritten model)
    output: str  # the layer's output tensor (same name in both models)
    weight: str  # initializer of the last factor's weight
    bias: str  # initializer of its bias (builders always create one, zeros if need be)
    kind: str
    result: dict[str, Any] | None = None
    conv: dict[str, list[int]] | None = None  # kind "conv": strides, pads, dilations
    first: FirstFactor | None = None  # set: both factors are fitted (low_rank_refit)


def refit_layers(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    sites: list[RefitSite],
    context: PassContext,
    relu_aware: bool = True,
) -> dict[str, Any]:
    """Refit every site in place in `rewritten`; returns a summary for the pass record.
    relu_aware: refine the last factor of a layer that feeds a Relu only (relu_refit)."""
    order = {out: i for i, node in enumerate(rewritten.graph.node) for out in node.output}
    peak = 0
    improved = 0
    ordered = sorted(sites, key=lambda s: order.get(s.output, 0))
    pairs = pair_reader(original, rewritten, context)
    for site in track(context.progress, "refitting layers", ordered):
        if site.first is not None:
            sample = _first_row_sample(rewritten, site, context) if relu_aware else None
            site.result, batch_bytes = fit_both_factors(rewritten, site, pairs, sample)
            improved += site.result["fit"] != "as built"
            k, n = site.first.prior.shape[1], site.first.prior.shape[0]
            peak = max(peak, batch_bytes + 16 * (k * k + k * n))  # two accumulators
            continue
        sample = _row_sample(rewritten, site, context) if relu_aware else None
        equations, batch_bytes = _accumulate(rewritten, site, pairs, sample)
        sums_bytes = 8 * (equations.k**2 + equations.k * equations.n + equations.k + equations.n)
        peak = max(peak, batch_bytes + sums_bytes)
        weight, bias = _current_factor(rewritten, site)
        energy = equations.residual_sum_of_squares(np.zeros_like(weight), np.zeros_like(bias))
        before = equations.residual_sum_of_squares(weight, bias)
        new_weight, new_bias = equations.solve()
        after = equations.residual_sum_of_squares(new_weight, new_bias)
        if after < before:  # refit must never make a layer worse on the calibration data
            _write_factor(rewritten, site, new_weight, new_bias)
            improved += 1
        else:
            after, new_weight, new_bias = before, weight, bias
        site.result = {
            "calibration_rel_error_before": round(float(np.sqrt(before / max(energy, 1e-30))), 6),
            "calibration_rel_error_after": round(float(np.sqrt(after / max(energy, 1e-30))), 6),
            "rows": equations.count,
        }
        if sample is not None:
            relu_weight, relu_bias, relu_result = relu_refit.refine(sample, new_weight, new_bias)
            site.result.update(relu_result)
            if relu_weight is not new_weight:
                _write_factor(rewritten, site, relu_weight, relu_bias)
    samples = sample_count(context.calibration)
    return {"layers": len(sites), "improved": improved, "samples": samples, "peak_bytes": int(peak)}


def pair_reader(original, rewritten, context: PassContext) -> PairReader:
    """How the sites' tensors are read, in graph order: streamed (each model run forward once,
    `refit_stream`) where the live tensors fit in memory; a site where they do not is read
    cut from the inputs (`runtime.paired_outputs`) and the next starts a new stream."""
    from onnxcompress.runtime import paired_outputs

    batches, threads = context.calibration or [], context.threads
    stream: RefitStream | None = None
    streamable = True

    def read(source: str, target: str):
        nonlocal stream, streamable
        try:
            if streamable and stream is None:
                stream = RefitStream(original, rewritten, batches, threads, (source, target))
            if stream is not None:
                return stream.pairs(source, target)
        except Exhausted as exc:
            log.debug("refit: %s read from the inputs (%s)", source, exc)
            stream = None
        except ValueError as exc:  # subgraphs, or a tensor the stream let go of
            log.debug("refit: reading from the inputs from %s on (%s)", source, exc)
            stream, streamable = None, False
        return paired_outputs(original, source, rewritten, target, batches, threads)

    return read


def _first_row_sample(rewritten, site: RefitSite, context: PassContext):
    """The ReLU step's rows of a two-factor site: the first factor's input rows."""
    if not relu_refit.relu_fed(rewritten, site.output):
        return None
    k, n = site.first.prior.shape[1], site.first.prior.shape[0]
    return relu_refit.RowSample(k, n, len(context.calibration or []))


def _row_sample(rewritten, site: RefitSite, context: PassContext):
    if not relu_refit.relu_fed(rewritten, site.output):
        return None
    weight = _initializer(rewritten, site.weight)
    k = weight.shape[0] if site.kind == "matmul" else int(np.prod(weight.shape[1:]))
    n = weight.shape[1] if site.kind == "matmul" else weight.shape[0]
    return relu_refit.RowSample(k, n, len(context.calibration or []))


def _accumulate(rewritten, site: RefitSite, pairs: PairReader, sample=None):
    weight = _initializer(rewritten, site.weight)
    if site.kind == "matmul":
        k, n = weight.shape
    else:  # n rows of k: conv weights flattened, a transposed Gemm weight as it is
        k, n = int(np.prod(weight.shape[1:])), weight.shape[0]
    equations = LeastSquaresAccumulator(k, n)
    batch_bytes, seen = 0, 0
    for batch, y, z in pairs(site.output, site.input):
        batch_bytes = max(batch_bytes, y.nbytes + z.nbytes)
        inputs = conv_patches(z, weight.shape[2:], site.conv) if site.kind == "conv" else z
        inputs, targets = _rows(inputs, site.kind), _rows(y, site.kind)
        # Token activations: padding positions hold meaningless values, fit real tokens only.
        mask = token_row_mask(batch, z) if site.kind.startswith("matmul") else None
        sample_of_row = row_samples(seen, len(z), len(inputs))
        seen += len(z)
        if mask is not None:
            inputs, targets, sample_of_row = inputs[mask], targets[mask], sample_of_row[mask]
        equations.add(inputs, targets)
        if sample is not None:
            sample.add(inputs, targets, sample_of_row)
    return equations, batch_bytes


def _rows(tensor: np.ndarray, kind: str) -> np.ndarray:
    """One row per sample position, features in columns."""
    if kind in ("conv1x1", "conv"):
        return np.moveaxis(tensor, 1, -1).reshape(-1, tensor.shape[1])
    return tensor.reshape(-1, tensor.shape[-1])


def _current_factor(model: onnx.ModelProto, site: RefitSite) -> tuple[np.ndarray, np.ndarray]:
    """The last factor as P (n × k) and b (n,), the accumulator's convention."""
    weight = _initializer(model, site.weight).astype(np.float64)
    projection = weight.T if site.kind == "matmul" else weight.reshape(weight.shape[0], -1)
    return projection, _initializer(model, site.bias).astype(np.float64).reshape(-1)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    # Refit sites always point at initializers the pass wrote; converting only these two
    # (not every weight of the model) keeps each site's cost independent of model size.
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def _write_factor(model: onnx.ModelProto, site: RefitSite, projection, bias) -> None:
    inits = {init.name: init for init in model.graph.initializer}
    for name, value in (
        (site.weight, projection.T if site.kind == "matmul" else projection),
        (site.bias, bias),
    ):
        old = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(
            numpy_helper.from_array(value.reshape(old.shape).astype(old.dtype), name)
        )
