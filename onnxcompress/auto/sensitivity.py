"""Damage of each candidate rewrite, measured: the model's output error on calibration data
when only that one layer is replaced (and refit), the rest of the model left original.

One job per layer, independent of the others, so jobs run through an `Executor` (serial,
processes with `--jobs`, Ray tasks with `--executor ray`). A job carries handles the executor
shared the model and the data through (`share_inputs`), not copies or driver-local paths: a
worker reads them once and keeps them for the jobs that follow (`_STATE`), which is what makes
worker pools pay off. A job also returns the shape of each rewrite (nodes and initializer
specs), so the caller can time it without rebuilding it."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcompress import downstream
from onnxcompress.analyse import analyse
from onnxcompress.auto import latency_cache as latency_cache
from onnxcompress.auto.candidates import RUNG_FRACTIONS, layer_choices, method_layers
from onnxcompress.errors import CompressError
from onnxcompress.executor import Executor, Shared
from onnxcompress.io import write_bytes_atomic
from onnxcompress.layers import Namer
from onnxcompress.passkit import PassContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityJob:
    """Measure the candidates of one layer. `factory` is "module:function" returning the
    methods by name from `factory_options` (importable by a fresh worker process). `model`
    holds the serialized model, `data` the calibration batches (None: weight error), `digest`
    identifies both (`share_inputs`)."""

    model: Shared
    data: Shared | None
    digest: str
    factory: str
    factory_options: dict[str, Any]
    layer: str
    input_shapes: dict[str, list[int]]
    threads: int = 1
    seed: int = 0
    fractions: tuple[float, ...] = ()


@dataclass
class Measured:
    """What a job found for one candidate."""

    layer: str
    key: str
    damage: float  # squared relative L2 of the model's outputs (or of the weights, no data)
    basis: str  # "outputs" | "weights"
    agreement: float | None = None  # top-1 agreement with the original, classifier outputs
    nodes: list[bytes] = field(default_factory=list)  # the rewrite's nodes, serialized
    initializers: list[tuple[str, list[int], int]] = field(default_factory=list)  # name, dims, type


_STATE: dict[tuple, _WorkerState] = {}


@dataclass
class _WorkerState:
    model: onnx.ModelProto
    methods: dict[str, Any]
    layers: dict[str, tuple[list, list]]  # method name -> its (layers, skip records)
    context: PassContext
    reference: list[np.ndarray] | None


def share_inputs(
    pool: Executor, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]] | None
) -> tuple[Shared, Shared | None, str]:
    """The model and calibration batches shared through `pool` once for all jobs, and a digest
    of both (the result cache's and the workers' key)."""
    blob = model.SerializeToString()
    digest = hashlib.sha256(blob)
    for batch in batches or []:
        for name in sorted(batch):
            value = np.ascontiguousarray(batch[name])
            digest.update(f"{name}{value.dtype}{value.shape}".encode())
            digest.update(value.tobytes())
    data = pool.share(batches) if batches else None
    return pool.share(blob), data, digest.hexdigest()


def measure_layer(job: SensitivityJob) -> list[Measured]:
    """Every candidate of `job.layer`: build, replace in the original, refit, run, compare.
    Results are kept in the cache folder, keyed by the model's and the data's bytes and the
    job's settings, so a second run on the same model and data measures nothing again."""
    key = _cache_key(job)
    cached = _cached(key)
    if cached is not None:
        return cached
    found = _measure_layer(job)
    _store(key, found)
    return found


def _measure_layer(job: SensitivityJob) -> list[Measured]:
    state = _state(job)
    found, _ = layer_choices(
        state.model, state.methods, state.layers, job.fractions or RUNG_FRACTIONS, job.layer
    )
    if not found:
        return []
    part = None
    if state.reference is not None:
        part = downstream.downstream(state.model, job.layer, state.context)
    return [_measure(state, part, found[0], option) for option in found[0].candidates]


def _measure(state: _WorkerState, part: downstream.Downstream | None, choice, option) -> Measured:
    layer = choice.layers[option.method]
    rewrite = state.methods[option.method].build(layer, option.candidate, Namer(state.model))
    shapes = [(init.name, list(init.dims), init.data_type) for init in rewrite.initializers]
    nodes = [node.SerializeToString() for node in rewrite.nodes]
    if state.reference is None:
        error = option.candidate.error**2
        return Measured(choice.name, option.key, float(error), "weights", None, nodes, shapes)
    trial, context = downstream.rewritten_alone(
        state.model, part, layer.name, rewrite, state.context
    )
    outputs = run_outputs(trial, context)
    if part:
        outputs = part.whole(outputs, state.reference)
    damage, agreement = output_damage(state.reference, outputs)
    return Measured(choice.name, option.key, damage, "outputs", agreement, nodes, shapes)


def output_damage(
    reference: list[np.ndarray], outputs: list[np.ndarray]
) -> tuple[float, float | None]:
    """(squared relative L2 over all outputs, top-1 agreement of the first output when it
    looks like class scores [N, classes], else None)."""
    energy = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    error = sum(
        float(np.sum((o.astype(np.float64) - r) ** 2))
        for o, r in zip(outputs, reference, strict=True)
    )
    first, first_ref = outputs[0], reference[0]
    agreement = None
    if first.ndim == 2 and first.shape[1] > 1:
        agreement = float(np.mean(first.argmax(1) == first_ref.argmax(1)))
    return error / max(energy, 1e-30), agreement


def run_outputs(model: onnx.ModelProto, context: PassContext) -> list[np.ndarray]:
    """All graph outputs over all calibration batches, concatenated along the batch axis."""
    from onnxcompress.runtime import make_session, run_session

    session = make_session(model, threads=context.threads, optimize=True)
    names = [out.name for out in session.get_outputs()]
    per_batch = [run_session(session, batch, names) for batch in context.calibration or []]
    return [np.concatenate([b[i] for b in per_batch]) for i in range(len(names))]


def _state(job: SensitivityJob) -> _WorkerState:
    key = (job.digest, job.factory, json.dumps(job.factory_options, sort_keys=True))
    if key not in _STATE:
        _STATE.clear()  # one model per worker at a time: memory stays bounded
        model = onnx.load_model_from_string(job.model.get())
        batches = job.data.get() if job.data is not None else None
        context = PassContext(job.input_shapes, batches, job.seed, job.threads)
        module, _, name = job.factory.partition(":")
        methods = getattr(importlib.import_module(module), name)(job.factory_options, context)
        layers = method_layers(model, analyse(model, job.input_shapes), methods)
        reference = run_outputs(model, context) if batches else None
        _STATE[key] = _WorkerState(model, methods, layers, context, reference)
    return _STATE[key]


# Bump when what a job measures changes, so old cached results are not read.
# 2: cp fits with a ridge (cp.l2_reg).
CACHE_VERSION = 2


def _cache_key(job: SensitivityJob) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    digest.update(job.digest.encode())
    settings = [job.factory, job.factory_options, job.layer, job.input_shapes, job.seed]
    digest.update(json.dumps([*settings, list(job.fractions)], sort_keys=True).encode())
    return digest.hexdigest()


def _cache_path(key: str) -> Path:
    return latency_cache.cache_folder() / "sensitivity" / f"{key}.json"


def _cached(key: str) -> list[Measured] | None:
    try:
        rows = json.loads(_cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    return [
        Measured(**{**row, "nodes": [base64.b64decode(n) for n in row["nodes"]],
                    "initializers": [tuple(i) for i in row["initializers"]]})
        for row in rows
    ]  # fmt: skip


def _store(key: str, found: list[Measured]) -> None:
    rows = [
        {**dataclasses.asdict(m), "nodes": [base64.b64encode(n).decode() for n in m.nodes]}
        for m in found
    ]
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(json.dumps(rows).encode(), path)
    except (OSError, CompressError) as exc:  # the cache is an optimisation, never a failure
        log.debug("sensitivity cache not written: %s", exc)
