"""Data-aware fit of both factors of a low-rank layer (x → first → last), in graph order.

The calibration refit (layer_refit) fits the last factor only, the first one staying the
weight-space truncation. Where the first factor is itself a plain linear map of the layer's
input (x @ A, or a 1×1 conv of stride 1 and no pads), both are fitted at once by reduced-rank
regression (maths.reduced_rank) to the original layer's outputs from the compressed model's
inputs, the penalty λ‖P − P₀‖² keeping the directions the data does not excite at the original
weight P₀. Every 5th calibration sample is held out: the fit kept (as built, last factor
only, or both at one λ of a grid) is the one with the least output error on those samples, so
a fit that over-fits the calibration rows is not chosen; it is then refitted on every sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress import relu_refit
from onnxcompress.holdout import checking, row_samples
from onnxcompress.maths.least_squares import LeastSquaresAccumulator, solve_symmetric
from onnxcompress.maths.patches import conv_patches
from onnxcompress.maths.reduced_rank import reduced_rank_fit
from onnxcompress.token_rows import token_row_mask

# λ of the penalty towards the original weight, in units of trace(Σ x xᵀ)/k (the data's
# weight per input direction): from "the data decides" to "stay near the weights".
STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# The last-factor-only fit's ridge, as layer_refit's least-squares solve uses.
LAST_RIDGE = 1e-6
LAST_ONLY = "last factor"
# Widest first-factor input fitted both ways: two k×k float64 accumulators of 4608 features
# (a 3×3 conv on 512 channels) take 340 MB; wider layers keep the last-factor refit.
MAX_FEATURES = 4608


@dataclass
class FirstFactor:
    """The first factor of a two-factor rewrite, when it is a plain linear map of the input."""

    input: str  # the tensor it reads in the rewritten model
    weight: str  # its initializer
    # "matmul": (k, r) read as x @ A; "conv1x1": (r, k, 1, 1), stride 1, no pads;
    # "conv": (r, c, kh, kw) with `conv`'s geometry, k = c·kh·kw features per patch
    kind: str
    prior: np.ndarray  # the weight P₀ (n × k, y = P₀ x) the penalty pulls towards
    conv: dict[str, list[int]] | None = None  # kind "conv": strides, pads, dilations
    kernel: tuple[int, int] | None = None  # kind "conv": kh, kw


@dataclass
class _Fit:
    label: str
    projection: np.ndarray  # n × k
    bias: np.ndarray
    factors: tuple[np.ndarray, np.ndarray] | None = None  # (first r × k, last n × r)


def fit_both_factors(rewritten: onnx.ModelProto, site, pairs, sample=None):
    """Refit `site` (a layer_refit.RefitSite with `first`) in place, its tensors read by
    `pairs` (a layer_refit.PairReader); returns (result, bytes). `sample`: a
    relu_refit.RowSample to fill, when the last factor gets the ReLU-aware step."""
    first = site.first
    held_out, fitted, batch_bytes = _accumulate(site, pairs, sample)
    current = _current(rewritten, site)
    judge = held_out if held_out.count else fitted
    candidates = [current, *_fits(fitted, current, first.prior)]
    errors = [judge.residual_sum_of_squares(f.projection, f.bias) for f in candidates]
    best = candidates[int(np.argmin(errors))]
    energy = _energy(judge, current)
    fitted.merge(held_out)  # the chosen fit is made again on every sample
    if best is not current:
        best = _refitted(best, fitted, current, first.prior)
    relu_result = {}
    if sample is not None:
        best, relu_result = _relu_refined(best, sample)
    if best is not current:
        _write(rewritten, site, best)
    everything = _energy(fitted, current)
    result = {
        "fit": best.label,
        "calibration_rel_error_before": _relative(
            fitted.residual_sum_of_squares(current.projection, current.bias), everything
        ),
        "calibration_rel_error_after": _relative(
            fitted.residual_sum_of_squares(best.projection, best.bias), everything
        ),
        "held_out_rel_error_before": _relative(errors[0], energy),
        "held_out_rel_error_after": _relative(min(errors), energy),
        "held_out_rows": held_out.count,
        "rows": fitted.count,
        **relu_result,
    }
    return result, batch_bytes


def _relu_refined(fit: _Fit, sample) -> tuple[_Fit, dict]:
    """The last factor refined for the Relu its output feeds, on the first factor's outputs."""
    first, last = fit.factors
    last_new, bias, result = relu_refit.refine(sample, last, fit.bias, lambda x: x @ first.T)
    if last_new is last:
        return fit, result
    return _Fit(fit.label + ", ReLU-aware", last_new @ first, bias, (first, last_new)), result


def _accumulate(site, pairs, sample=None):
    k, n = site.first.prior.shape[1], site.first.prior.shape[0]
    held_out, fitted = LeastSquaresAccumulator(k, n), LeastSquaresAccumulator(k, n)
    seen, batch_bytes = 0, 0
    for batch, y, x in pairs(site.output, site.first.input):
        batch_bytes = max(batch_bytes, x.nbytes + y.nbytes)
        if site.first.kind == "conv":
            x = conv_patches(x, site.first.kernel, site.first.conv)
        inputs, targets, samples = _rows(x, site.first.kind), _rows(y, site.first.kind), len(x)
        sample_of_row = row_samples(seen, samples, len(inputs))
        seen += samples
        mask = token_row_mask(batch, x) if site.first.kind == "matmul" else None
        if mask is not None:
            inputs, targets, sample_of_row = inputs[mask], targets[mask], sample_of_row[mask]
        check = checking(sample_of_row)
        held_out.add(inputs[check], targets[check])
        fitted.add(inputs[~check], targets[~check])
        if sample is not None:
            sample.add(inputs, targets, sample_of_row)
    return held_out, fitted, batch_bytes


def _rows(tensor: np.ndarray, kind: str) -> np.ndarray:
    if kind in ("conv1x1", "conv"):
        return np.moveaxis(tensor, 1, -1).reshape(-1, tensor.shape[1])
    return tensor.reshape(-1, tensor.shape[-1])


def _fits(
    equations: LeastSquaresAccumulator, current: _Fit, prior: np.ndarray, only: str | None = None
) -> list[_Fit]:
    """The last factor refitted under the current first one, and both at every strength
    (`only`: just the fit of that label)."""
    if equations.count == 0:
        return []
    mean_x, mean_y, gram, cross = equations.centred()
    fits = []
    if only in (None, LAST_ONLY):
        fits.append(_last_only(current, mean_x, mean_y, gram, cross))
    unit = max(float(np.trace(gram)) / len(gram), 1e-30)
    rank = current.factors[0].shape[0]
    for strength in STRENGTHS:
        label = f"both factors, λ={strength:g}"
        if only in (None, label):
            low = reduced_rank_fit(gram, cross, rank, prior, strength * unit)
            fits.append(_with_bias(label, low.first, low.last, mean_x, mean_y))
    return fits


def _last_only(current: _Fit, mean_x, mean_y, gram, cross) -> _Fit:
    first = current.factors[0]
    gram_z, cross_z = first @ gram @ first.T, first @ cross
    ridge = LAST_RIDGE * max(float(np.trace(gram_z)) / len(gram_z), 1e-30)
    last = solve_symmetric(gram_z + ridge * np.eye(len(gram_z)), cross_z).T
    return _with_bias(LAST_ONLY, first, last, mean_x, mean_y)


def _with_bias(label, first, last, mean_x, mean_y) -> _Fit:
    projection = last @ first
    return _Fit(label, projection, mean_y - projection @ mean_x, (first, last))


def _refitted(best: _Fit, equations, current: _Fit, prior) -> _Fit:
    return _fits(equations, current, prior, only=best.label)[0]


def _energy(equations: LeastSquaresAccumulator, fit: _Fit) -> float:
    """Σ‖y‖² over the samples: what a relative error is relative to."""
    return equations.residual_sum_of_squares(np.zeros_like(fit.projection), np.zeros_like(fit.bias))


def _relative(squared: float, energy: float) -> float:
    return round(float(np.sqrt(squared / max(energy, 1e-30))), 6)


def _current(model: onnx.ModelProto, site) -> _Fit:
    inits = {init.name: init for init in model.graph.initializer}
    first = numpy_helper.to_array(inits[site.first.weight]).astype(np.float64)
    last = numpy_helper.to_array(inits[site.weight]).astype(np.float64)
    bias = numpy_helper.to_array(inits[site.bias]).astype(np.float64).reshape(-1)
    if site.first.kind == "matmul":
        first, last = first.T, last.T  # x @ A @ B: P = Bᵀ Aᵀ
    else:
        first, last = first.reshape(first.shape[0], -1), last.reshape(last.shape[0], -1)
    return _Fit("as built", last @ first, bias, (first, last))


def _write(model: onnx.ModelProto, site, fit: _Fit) -> None:
    first, last = fit.factors
    if site.first.kind == "matmul":
        first, last = first.T, last.T
    inits = {init.name: init for init in model.graph.initializer}
    for name, value in ((site.first.weight, first), (site.weight, last), (site.bias, fit.bias)):
        old = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(
            numpy_helper.from_array(value.reshape(old.shape).astype(old.dtype), name)
        )
