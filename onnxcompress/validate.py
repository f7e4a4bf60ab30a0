"""Run models with onnxruntime and compare the original with the result on the same inputs:
per output max abs error, relative L2 and cosine; top-1 agreement and accuracy for classifiers."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress import graph
from onnxcompress.calibration import (
    Calibration,
    calibration_inputs,
    load_npz_inputs,
    random_inputs,
)
from onnxcompress.errors import CompressError
from onnxcompress.images import Preprocess, load_images, parse_preprocess
from onnxcompress.input_checks import non_finite_count
from onnxcompress.runtime import make_session, run_session

__all__ = [
    "Calibration",
    "Preprocess",
    "calibration_inputs",
    "compare_models",
    "load_images",
    "load_npz_inputs",
    "parse_preprocess",
    "random_inputs",
]

log = logging.getLogger(__name__)


def require_nan_free_outputs(
    model: onnx.ModelProto, session: ort.InferenceSession, calibration: Calibration
) -> None:
    """Refuse a model that outputs NaN on the first calibration batch (a NaN weight, or inputs
    it cannot take): no error can be measured against it, and the passes' fits fail on it."""
    names = [out.name for out in session.get_outputs()]
    for name, value in zip(names, run_session(session, calibration.batches[0]), strict=True):
        if np.issubdtype(np.asarray(value).dtype, np.floating) and np.isnan(value).any():
            raise CompressError(
                f"the model's output '{name}' is NaN on the calibration inputs "
                f"({calibration.source}); {_nan_cause(model, calibration)}"
            )


def _nan_cause(model: onnx.ModelProto, calibration: Calibration) -> str:
    readers = graph.consumers(model)
    for name, value in graph.constant_tensors(model).items():
        bad = non_finite_count(value)
        if bad and readers.get(name):
            reader = readers[name][0].name or readers[name][0].op_type
            return (
                f"its weight '{name}' (read by node '{reader}') holds {bad} "
                "NaN or infinite value(s): fix the model's weights"
            )
    if calibration.source.startswith("random"):
        return "give real inputs with --data, or their range with --input-range"
    return "fix the model, or the data it is given"


def compare_models(
    original: onnx.ModelProto | bytes,
    result: onnx.ModelProto | bytes,
    calibration: Calibration,
    threads: int = 2,
) -> dict:
    """Run both models batch by batch and compare every output (JSON-ready).

    Per output: max_abs; rel_l2 = ||a - b|| / ||a|| over the whole calibration set (||a - b||
    when the original output is all zeros); cosine = mean over samples (axis 0) of the cosine
    of the flattened per-sample outputs, with cosine_min the worst sample (one cosine over
    everything when each sample has a single value). Classifier-like outputs ([N, C] or
    [N, C, 1, 1], C > 1) add top1_agreement, and with labels accuracy_original,
    accuracy_result and accuracy_drop. Non-finite result values make max_abs and rel_l2 inf.
    """
    session_before = make_session(original, threads)
    session_after = make_session(result, threads)
    names = [out.name for out in session_before.get_outputs()]
    names_after = [out.name for out in session_after.get_outputs()]
    if sorted(names) != sorted(names_after):
        raise CompressError(
            f"the result's outputs ({', '.join(names_after)}) differ from the original's "
            f"({', '.join(names)})"
        )
    stats = {name: _OutputStats(name) for name in names}
    for batch in calibration.batches:
        before = run_session(session_before, batch, names)
        after = run_session(session_after, batch, names)
        for name, a, b in zip(names, before, after, strict=True):
            stats[name].add(a, b)
    # The first output with rows counts the samples: another may be empty (no detections).
    samples = next((stat.rows for stat in stats.values() if stat.rows), 0)
    if samples == 0 and _no_input_rows(calibration):  # figures over nothing read as exact
        raise CompressError(f"no samples to validate on ({calibration.source})")
    labels = calibration.labels
    if labels is not None and not any(s.predictions_before for s in stats.values()):
        log.warning("labels given, but no output looks like class scores: no accuracy")
    outputs = {name: stat.summary(labels) for name, stat in stats.items()}
    return {
        "outputs": outputs,
        "worst_rel_l2": max((out["rel_l2"] for out in outputs.values()), default=0.0),
        "samples": samples,
        "source": calibration.source,
    }


def _no_input_rows(calibration: Calibration) -> bool:
    return all(
        np.size(value) == 0
        for batch in calibration.batches
        for value in batch.values()
        if np.ndim(value) > 0
    )


def is_classifier_output(shape: tuple[int, ...]) -> bool:
    """[N, C] or [N, C, 1, 1] with C > 1: scores over classes."""
    if len(shape) == 2:
        return shape[1] > 1
    return len(shape) == 4 and shape[1] > 1 and shape[2] == shape[3] == 1


def _unit_rows(scores: np.ndarray) -> bool:
    """Signed rows of L2 norm 1: normalised embeddings (sentence encoders), not class scores,
    so top-1 agreement would mean nothing (cosine is the figure that does). Softmax
    probabilities are never negative, so a confident softmax (L2 norm near 1) is not taken."""
    rows = scores.reshape(len(scores), -1).astype(np.float64)
    if not rows.size or not np.any(rows < 0):
        return False
    return bool(np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-4))


@dataclass
class _OutputStats:
    """Running sums for one output, so batches need not be kept."""

    name: str
    shape: list[int] | None = None
    max_abs: float = 0.0
    diff_square: float = 0.0
    reference_square: float = 0.0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    rows: int = 0
    row_size: int = 0
    dot: float = 0.0  # whole-output cosine, for outputs with one value per sample
    square_before: float = 0.0
    square_after: float = 0.0
    nonfinite_result: int = 0
    embedding: bool | None = None  # decided on the first batch, so every batch counts alike
    predictions_before: list[np.ndarray] = field(default_factory=list)
    predictions_after: list[np.ndarray] = field(default_factory=list)

    def add(self, before: np.ndarray, after: np.ndarray) -> None:
        before = np.atleast_1d(np.asarray(before, np.float64))
        after = np.atleast_1d(np.asarray(after, np.float64))
        if before.shape != after.shape:
            raise CompressError(
                f"output '{self.name}' has shape {list(before.shape)} in the original and "
                f"{list(after.shape)} in the result"
            )
        if len(before) == 0:
            return  # an empty output (e.g. no detections) in both models adds nothing
        self.shape = self.shape or list(before.shape)
        self.nonfinite_result += int(np.count_nonzero(~np.isfinite(after)))
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            diff = np.where(before == after, 0.0, before - after)  # equal infinities: no error
            diff[~np.isfinite(diff)] = np.inf
            if diff.size:
                self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
            self.diff_square += float(np.sum(diff * diff))
            self.reference_square += float(np.sum(np.square(before[np.isfinite(before)])))
            self._add_cosines(before.reshape(len(before), -1), after.reshape(len(after), -1))
        if self.embedding is None:
            self.embedding = _unit_rows(before)
        if is_classifier_output(before.shape) and not self.embedding:
            self.predictions_before.append(before.reshape(len(before), -1).argmax(axis=1))
            self.predictions_after.append(after.reshape(len(after), -1).argmax(axis=1))

    def _add_cosines(self, before: np.ndarray, after: np.ndarray) -> None:
        dots = np.sum(before * after, axis=1)
        norms_before = np.sum(before * before, axis=1)
        norms_after = np.sum(after * after, axis=1)
        cosines = np.nan_to_num(dots / np.sqrt(norms_before * norms_after), nan=0.0)
        both_zero = (norms_before == 0) & (norms_after == 0)
        cosines = np.clip(np.where(both_zero, 1.0, cosines), -1.0, 1.0)
        self.cosine_sum += float(np.sum(cosines))
        if cosines.size:
            self.cosine_min = min(self.cosine_min, float(np.min(cosines)))
        self.rows += len(before)
        self.row_size = before.shape[1]
        self.dot += float(np.sum(dots))
        self.square_before += float(np.sum(norms_before))
        self.square_after += float(np.sum(norms_after))

    def summary(self, labels: np.ndarray | None) -> dict:
        error_norm = math.sqrt(self.diff_square)
        reference_norm = math.sqrt(self.reference_square)
        rel_l2 = error_norm / reference_norm if reference_norm > 0 else error_norm
        summary = {
            "shape": self.shape,
            "max_abs": self.max_abs,
            "rel_l2": rel_l2 if math.isfinite(rel_l2) else math.inf,
            "cosine": self._cosine(),
            "cosine_min": self.cosine_min if self.row_size > 1 else self._cosine(),
            "nonfinite_result": self.nonfinite_result,
        }
        if self.rows == 0:
            summary["empty"] = True  # empty for every sample in both models: equal, not measured
        if self.predictions_before:
            summary.update(self._classification(labels))
        return summary

    def _cosine(self) -> float:
        if self.row_size > 1:
            return self.cosine_sum / self.rows if self.rows else 1.0
        if self.square_before == 0 and self.square_after == 0:
            return 1.0
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            cosine = self.dot / math.sqrt(self.square_before * self.square_after)
        return float(np.clip(cosine, -1.0, 1.0)) if math.isfinite(cosine) else 0.0

    def _classification(self, labels: np.ndarray | None) -> dict:
        before = np.concatenate(self.predictions_before)
        after = np.concatenate(self.predictions_after)
        figures = {"top1_agreement": float(np.mean(before == after))}
        if labels is not None:
            if len(labels) != len(before):
                raise CompressError(
                    f"{len(labels)} labels for {len(before)} samples of output '{self.name}'"
                )
            accuracy_before = float(np.mean(before == labels))
            accuracy_after = float(np.mean(after == labels))
            figures.update(
                accuracy_original=accuracy_before,
                accuracy_result=accuracy_after,
                accuracy_drop=accuracy_before - accuracy_after,
            )
        return figures
