"""The ReLU-aware step of the calibration refit: where a refitted layer's output goes only into
a Relu, its last factor is fitted so that what the Relu lets through matches (maths.rectified_fit,
Zhang et al. TPAMI 2016's nonlinear response reconstruction) on a sample of the rows the
least-squares refit saw, and kept only if it lowers that error on held-out samples."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.holdout import checking
from onnxcompress.maths.rectified_fit import downstream_error, downstream_fit

# Rows kept for the ReLU-aware iterations, at most, and at most this many bytes of them: the
# iterations hold them in memory (the least-squares sums do not need to).
MAX_ROWS = 16384
MAX_BYTES = 64 << 20


def relu_fed(model: onnx.ModelProto, tensor: str) -> bool:
    """True when `tensor` is read by Relu nodes only and is not a graph output."""
    if any(output.name == tensor for output in model.graph.output):
        return False
    readers = graph.consumers(model).get(tensor, [])
    return bool(readers) and all(node.op_type == "Relu" for node in readers)


class RowSample:
    """A seeded sample of (input, target) rows, spread over the batches, split into rows to fit
    on and rows of the samples holdout.checking holds out to judge the fit on."""

    def __init__(self, features: int, outputs: int, batches: int, seed: int = 0):
        limit = min(MAX_ROWS, MAX_BYTES // (8 * (features + outputs)))
        self.per_batch = max(1, limit // max(batches, 1))
        self.rng = np.random.default_rng(seed)
        self.fit: list[tuple[np.ndarray, np.ndarray]] = []
        self.check: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, inputs: np.ndarray, targets: np.ndarray, sample_of_row: np.ndarray) -> None:
        """Rows of one batch; sample_of_row: each row's calibration sample, counted over all."""
        rows = len(inputs)
        chosen = np.sort(self.rng.choice(rows, min(rows, self.per_batch), replace=False))
        held_out = checking(sample_of_row[chosen])
        self.fit.append((inputs[chosen[~held_out]], targets[chosen[~held_out]]))
        self.check.append((inputs[chosen[held_out]], targets[chosen[held_out]]))

    def rows(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        parts = self.fit if which == "fit" else self.check
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def refine(sample: RowSample, projection: np.ndarray, bias: np.ndarray, inputs_of=None):
    """(projection, bias, result): the ReLU-aware fit where it beats the given one on the
    held-out rows, else the given one; result says which and the held-out errors.
    inputs_of: maps the sample's rows to the factor's inputs (a first factor before it)."""
    fit_x, fit_y = sample.rows("fit")
    check_x, check_y = sample.rows("check")
    if inputs_of is not None:
        fit_x, check_x = inputs_of(fit_x), inputs_of(check_x)
    if not len(fit_x) or not len(check_x):
        return projection, bias, {"relu_aware": "no rows to fit or judge on"}
    no_offset = np.zeros((1, fit_y.shape[1]))  # no residual Add: the layer feeds the Relu

    def error(x, y, projection, bias) -> float:
        return downstream_error(x, y, no_offset, projection, bias, rectified=True)

    refined = downstream_fit(fit_x, fit_y, no_offset, rectified=True)
    energy = max(error(check_x, check_y, *_zeros(projection, bias)), 1e-30)
    before = error(check_x, check_y, projection, bias)
    after = error(check_x, check_y, *refined)
    result = {
        "relu_held_out_rel_error_before": round(float(np.sqrt(before / energy)), 6),
        "relu_held_out_rel_error_after": round(float(np.sqrt(min(before, after) / energy)), 6),
    }
    if after < before:
        result["relu_aware"] = "kept"
        dtype = projection.dtype
        return refined[0].astype(dtype), refined[1].astype(dtype), result
    result["relu_aware"] = "not better on held-out rows"
    return projection, bias, result


def _zeros(projection: np.ndarray, bias: np.ndarray):
    return np.zeros_like(projection), np.zeros_like(bias)
