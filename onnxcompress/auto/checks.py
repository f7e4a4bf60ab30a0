"""The whole-model checks of auto's rounds: output fidelity on the calibration data, and latency
against the original timed side by side in short windows."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxcompress import benchmark, graph
from onnxcompress.auto import sensitivity as sensitivity
from onnxcompress.auto.settings import SearchSettings
from onnxcompress.calibration import random_inputs
from onnxcompress.passkit import PassContext, first_samples, sample_count, track

# The original's whole-model timing (the layer tables' scale) runs at least this long.
TIMING_SECONDS = 1.0
# A plan's ratio is the median of short windows timing it beside the original, as one window
# is noisy whatever its length; see docs/decisions.md#window_seconds-check_windows
WINDOW_SECONDS = 0.5
CHECK_WINDOWS = 3
# The choice is made on these windows alone, taken at the end for every round together, as a
# round's own windows lean low; see docs/decisions.md#retime_windows
RETIME_WINDOWS = 5
# A round this close to the target is timed in CONFIRM_WINDOWS more windows before the search
# decides on it.
CONFIRM_BAND = 0.04
CONFIRM_WINDOWS = 4


class Checker:
    """Whole-model checks against the original: latency (same run) and output fidelity."""

    def __init__(self, model, context: PassContext, feeds, settings: SearchSettings) -> None:
        self.model, self.context, self.feeds, self.settings = model, context, feeds, settings
        self.reference = sensitivity.run_outputs(model, context) if context.calibration else None

    def __call__(self, compressed, kind: str) -> dict[str, Any]:
        check: dict[str, Any] = {}
        if self.reference is not None:
            outputs = sensitivity.run_outputs(compressed, self.context)
            damage, agreement = sensitivity.output_damage(self.reference, outputs)
            check["rel_l2"] = round(float(np.sqrt(damage)), 6)
            if agreement is not None:
                check["agreement"] = round(agreement, 6)
            drop = accuracy_drop(self.reference[0], outputs[0], self.context.labels)
            if drop is not None:
                check["accuracy_drop"] = round(drop, 4)
        if kind == "latency":
            windows = self._timed(check, compressed, CHECK_WINDOWS)
            ms = [w["compressed"]["median_ms"] for w in windows]
            check["latency_ms"] = round(float(np.median(ms)), 4)
        return check

    def windows(self, models: dict[str, Any], count: int, step: str = "") -> list[dict]:
        """`count` timings of the original with `models`, side by side in each; shown as a
        progress step when it has a name."""
        steps = range(count)
        if step:
            steps = track(self.context.progress, step, steps)
        return [window(self.model, models, self.feeds, self.context.threads) for _ in steps]

    def fails(self, check: dict[str, Any]) -> str:
        """Why the check fails the user's tolerance ("" when it holds or none was set)."""
        tol, drop = self.settings.max_rel_l2, self.settings.max_accuracy_drop
        if tol is not None and check.get("rel_l2", 0.0) > tol:
            return f"rel L2 {check['rel_l2']:.4f} > max_rel_l2 {tol:g}"
        if drop is not None and check.get("accuracy_drop", 0.0) > drop:
            return f"top-1 accuracy drop {check['accuracy_drop']:.2f} points > {drop:g}"
        if drop is not None and "accuracy_drop" not in check and "agreement" in check:
            if 100 * (1 - check["agreement"]) > drop:
                return f"top-1 agreement {100 * check['agreement']:.2f} % < {100 - drop:g} %"
        return ""

    def confirmed(self, check: dict, model, target: float) -> float:
        """The round's ratio, timed in CONFIRM_WINDOWS more windows first when it is within
        CONFIRM_BAND of the target: the search stops on such a round or steps by a little from
        it, so a few lucky windows must not decide (see
        docs/decisions.md#confirm_band-confirm_windows)."""
        if abs(check["latency_ratio"] - target) <= CONFIRM_BAND:
            self._timed(check, model, CONFIRM_WINDOWS)
        return check["latency_ratio"]

    def _timed(self, check: dict, model, count: int) -> list[dict]:
        """`count` more windows of `model` beside the original, recorded in `check`."""
        windows = self.windows({"compressed": model}, count)
        add_windows(check, [window_ratio(w, "compressed") for w in windows])
        return windows


def accuracy_drop(reference: np.ndarray, outputs: np.ndarray, labels) -> float | None:
    """Top-1 accuracy points lost on the calibration samples, when labels came with them and
    the first output holds class scores; else None (the agreement stands in for it)."""
    if labels is None or outputs.ndim != 2 or len(labels) != len(outputs):
        return None
    labels = np.asarray(labels).reshape(-1)
    before = np.mean(reference.argmax(1) == labels)
    return float(100 * (before - np.mean(outputs.argmax(1) == labels)))


def add_windows(check: dict, ratios: list[float]) -> None:
    """Record more windows' ratios in a check; its ratio is the median of all of them."""
    check["latency_windows"] = check.get("latency_windows", []) + ratios
    check["latency_ratio"] = round(float(np.median(check["latency_windows"])), 4)


def window_ratio(timing: dict, name: str) -> float:
    """A model's latency over the original's in one timing window."""
    return round(1 / benchmark.speedup(timing, "original", name), 4)


def window(original, models: dict[str, Any], feeds, threads: int) -> dict:
    """One timing window: `original` (named so) and `models` side by side."""
    return benchmark.benchmark_models(
        {"original": original, **models},
        feeds,
        threads=threads,
        repeats=20,
        min_seconds=WINDOW_SECONDS,
    )


def timing_feeds(model, context: PassContext) -> dict[str, np.ndarray]:
    """Inputs in the shapes the layers were timed at: the first calibration samples, joined
    across batches when the pinned batch is larger than one calibration batch, else random
    data."""
    rows = max((shape[0] for shape in context.input_shapes.values()), default=1)
    if context.calibration and sample_count(context.calibration) >= rows:
        samples = first_samples(context.calibration, rows)
        joined = {name: np.concatenate([s[name] for s in samples]) for name in samples[0]}
        return {
            name: value[: context.input_shapes.get(name, value.shape)[0]]
            for name, value in joined.items()
        }
    return random_inputs(model, context.input_shapes, count=1, seed=context.seed)[0]


def latency_ratio(model, other, context: PassContext) -> float:
    """`other`'s latency over `model`'s: the median of CONFIRM_WINDOWS windows of the two
    timed side by side, as the search times its plans."""
    feeds = timing_feeds(model, context)
    windows = [
        window(model, {"other": other}, feeds, context.threads) for _ in range(CONFIRM_WINDOWS)
    ]
    return round(float(np.median([window_ratio(w, "other") for w in windows])), 4)


def model_total(kind: str, model, analysis, feeds, threads: int) -> float:
    """The original's MACs, weight bytes or measured latency (ms): what ratios are of."""
    if kind == "macs":
        return float(analysis.total_macs)
    if kind == "bytes":
        return float(graph.weight_bytes(model))
    timing = benchmark.benchmark_models(
        {"original": model}, feeds, threads=threads, repeats=50, min_seconds=TIMING_SECONDS
    )
    return float(timing["original"]["median_ms"])
