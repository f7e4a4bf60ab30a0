"""Latency of several models in one process: the same session options for all, warm-up runs,
then repeats interleaved round-robin so that drift (heat, other load) hits every model alike."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress.errors import ORT_LOG_SEVERITY, CompressError
from onnxcompress.runtime import make_session, ort_message, run_session, session_options

log = logging.getLogger(__name__)

ort.set_default_logger_severity(ORT_LOG_SEVERITY)

# How idle pool threads wait (session config entries): "stop" spins during a run, as deployed,
# and frees the cores for the next session; see docs/decisions.md#default_spinning
SPINNING = {
    "stop": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    "off": {"session.intra_op.allow_spinning": "0"},
    "on": {"session.intra_op.allow_spinning": "1"},
}
DEFAULT_SPINNING = "stop"


def benchmark_models(
    models: dict[str, onnx.ModelProto | bytes],
    inputs: dict[str, np.ndarray],
    threads: int = 2,
    warmup: int = 5,
    repeats: int = 30,
    min_seconds: float = 0.0,
    spinning: str = DEFAULT_SPINNING,
) -> dict[str, dict]:
    """Time every model on the same inputs; per model the median and spread in milliseconds.

    Sessions run with all graph optimisations on (this measures deployment speed). Each round
    runs every model twice in turn and times the second run (warm caches, interleaved against
    drift). Rounds go on until `repeats` are done and at least `min_seconds` have passed.
    `spinning`: how idle pool threads wait (`SPINNING`).
    """
    if repeats < 1:
        raise CompressError(f"benchmark repeats must be at least 1, got {repeats}")
    if spinning not in SPINNING:
        raise CompressError(f"benchmark spinning: one of {', '.join(SPINNING)}, got {spinning!r}")
    available = _cpus_available()
    if threads > available:
        log.warning("benchmark uses %d threads on %d available CPUs", threads, available)
    sessions = {name: timing_session(model, threads, spinning) for name, model in models.items()}
    feeds = {name: _feeds(session, inputs) for name, session in sessions.items()}
    for name, session in sessions.items():
        for _ in range(warmup):
            run_session(session, feeds[name])
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    started = time.perf_counter()
    rounds = 0
    try:
        while rounds < repeats or time.perf_counter() - started < min_seconds:
            for name, session in sessions.items():
                # Untimed first, so the timed run finds this model's weights in cache, as a
                # deployed one would; see docs/decisions.md#warm-up-run-per-round
                session.run(None, feeds[name])
                begin = time.perf_counter()
                session.run(None, feeds[name])
                timings[name].append(time.perf_counter() - begin)
            rounds += 1
    except Exception as exc:
        raise CompressError(f"onnxruntime failed running the model: {ort_message(exc)}") from exc
    environment = {
        "threads": threads,
        "spinning": spinning,
        "onnxruntime": ort.__version__,
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
    }
    return {name: {**_statistics(times), **environment} for name, times in timings.items()}


def speedup(bench: dict, before: str, after: str) -> float:
    """How many times faster `after` runs than `before` (ratio of medians)."""
    return bench[before]["median_ms"] / bench[after]["median_ms"]


def timing_session(
    model: onnx.ModelProto | bytes, threads: int, spinning: str = DEFAULT_SPINNING
) -> ort.InferenceSession:
    """A session as the timing loop makes it: all graph optimisations, `threads` intra-op
    threads, pool threads waiting as `spinning` says (`SPINNING`)."""
    options = session_options(threads, optimize=True)
    for key, value in SPINNING[spinning].items():
        options.add_session_config_entry(key, value)
    return make_session(model, options=options)


def _feeds(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [inp.name for inp in session.get_inputs() if inp.name not in inputs]
    if missing:
        raise CompressError(f"benchmark: no input data for {', '.join(missing)}")
    return {inp.name: inputs[inp.name] for inp in session.get_inputs()}


def _statistics(seconds: list[float]) -> dict:
    milliseconds = np.asarray(seconds) * 1000.0
    p10, p25, median, p75, p90 = np.percentile(milliseconds, [10, 25, 50, 75, 90])
    return {
        "median_ms": float(median),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
        "iqr_ms": float(p75 - p25),
        "min_ms": float(milliseconds.min()),
        "runs": len(seconds),
    }


def _cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
