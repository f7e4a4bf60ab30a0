"""Latencies of small models measured in onnxruntime, kept across runs and processes.

The key is what the runtime's speed depends on, not the weights' values: the graph's ops,
attributes and wiring, tensor shapes and dtypes, the feeds' shapes, plus the onnxruntime
version, execution providers, thread count and machine. The store is an SQLite file in
`$ONNXCOMPRESS_CACHE_DIR`, else `~/.cache/onnxcompress/`; SQLite serialises concurrent
writers (worker processes), each write is one short transaction. A folder that cannot be
used is reported once and the run goes on uncached (only the in-process level).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress import benchmark

log = logging.getLogger(__name__)

ENV_VAR = "ONNXCOMPRESS_CACHE_DIR"
FILE_NAME = "latency.sqlite3"
# benchmark.benchmark_models runs every session on the CPU provider only.
PROVIDERS = ("CPUExecutionProvider",)
# Seconds a writer waits for another process's transaction before giving up on this write.
LOCK_TIMEOUT = 30.0


@dataclass(frozen=True)
class Timing:
    median_ms: float
    runs: int


def cache_folder() -> Path:
    """Where the cache lives: `$ONNXCOMPRESS_CACHE_DIR`, else `~/.cache/onnxcompress`."""
    folder = os.environ.get(ENV_VAR)
    return Path(folder).expanduser() if folder else Path.home() / ".cache" / "onnxcompress"


class LatencyCache:
    """Median latencies by key: an in-process dict in front of an SQLite file in `folder`
    (default `cache_folder()`). Never raises for the store: an unusable one is reported once
    (logging.WARNING) and ignored from then on."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else cache_folder()
        self.path = self.folder / FILE_NAME
        self._memory: dict[str, Timing] = {}
        self._disabled = False

    def get(self, key: str) -> Timing | None:
        """The stored timing for `key`, or None."""
        if key in self._memory:
            return self._memory[key]
        row = self._run("SELECT median_ms, runs FROM timings WHERE key = ?", (key,))
        if row:
            self._memory[key] = Timing(float(row[0]), int(row[1]))
            return self._memory[key]
        return None

    def put(self, key: str, timing: Timing, description: str = "") -> None:
        """Store `timing` for `key` (replacing an older one), here and on disk."""
        self._memory[key] = timing
        self._run(
            "INSERT OR REPLACE INTO timings VALUES (?, ?, ?, ?, ?)",
            (key, timing.median_ms, timing.runs, description, time.time()),
        )

    def _run(self, sql: str, parameters: tuple) -> tuple | None:
        if self._disabled:
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # A connection per statement: cheap next to any timing, and nothing to carry
            # across fork/spawn or to close.
            connection = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT)
            try:
                with connection:
                    connection.execute(
                        "CREATE TABLE IF NOT EXISTS timings (key TEXT PRIMARY KEY, "
                        "median_ms REAL, runs INTEGER, description TEXT, created REAL)"
                    )
                    return connection.execute(sql, parameters).fetchone()
            finally:
                connection.close()
        except (OSError, sqlite3.Error) as exc:
            self._disabled = True
            log.warning("latency cache %s not usable (%s): timing without it", self.path, exc)
            return None


_DEFAULT_CACHES: dict[Path, LatencyCache] = {}


def default_cache() -> LatencyCache:
    """One cache per folder per process, for the folder the environment names now."""
    folder = cache_folder()
    if folder not in _DEFAULT_CACHES:
        _DEFAULT_CACHES[folder] = LatencyCache(folder)
    return _DEFAULT_CACHES[folder]


def time_subgraphs(
    models: dict[str, onnx.ModelProto],
    feeds: dict[str, np.ndarray],
    threads: int = 2,
    cache: LatencyCache | None = None,
    repeats: int = 20,
    min_seconds: float = 0.05,
    prepare: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
    variant: str = "",
) -> dict[str, float]:
    """Median ms per model on `feeds`. Models the cache lacks (or holds with fewer than
    `repeats` runs) are timed together, interleaved, by `benchmark.benchmark_models`, and
    stored. Hits come from earlier timings, possibly of other runs on this machine.
    `prepare` turns a model into the one timed (int8 quantization, say), only on a miss:
    such timings are keyed by the model given and `variant`, which must name the change."""
    cache = cache if cache is not None else default_cache()
    keys = {name: model_key(model, feeds, threads, variant) for name, model in models.items()}
    found = {name: cache.get(key) for name, key in keys.items()}
    missing = {
        name: prepare(models[name]) if prepare else models[name]
        for name, hit in found.items()
        if not hit or hit.runs < repeats
    }
    if missing:
        timings = benchmark.benchmark_models(
            missing, feeds, threads=threads, warmup=3, repeats=repeats, min_seconds=min_seconds
        )
        for name, timing in timings.items():
            found[name] = Timing(timing["median_ms"], timing["runs"])
            cache.put(keys[name], found[name], _describe(missing[name]))
    return {name: found[name].median_ms for name in models}


def time_subgraph(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    threads: int = 2,
    cache: LatencyCache | None = None,
) -> float:
    """Median ms of one model on `feeds`, from the cache or measured (and then stored)."""
    return time_subgraphs({"model": model}, feeds, threads, cache)["model"]


def model_key(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int, variant: str = ""
) -> str:
    """Hex digest of the model's speed-relevant structure, the feeds and the environment
    (and `variant`, when the model is timed after a change such as int8 quantization)."""
    feed_shapes = sorted((name, list(a.shape), str(a.dtype)) for name, a in feeds.items())
    signature = {
        "graph": graph_signature(model.graph),
        "opsets": sorted((o.domain, o.version) for o in model.opset_import),
        "feeds": [shape[1:] for shape in feed_shapes],
        "environment": environment(threads),
    }
    if variant:  # absent otherwise, so the keys of plain timings stay what they were
        signature["variant"] = variant
    text = json.dumps(signature, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def graph_signature(graph: onnx.GraphProto) -> list:
    """Ops, attributes, wiring, shapes and dtypes; tensor names replaced by their order of
    appearance (identical layers under other names share a key) and tensor values left out
    (constants of other values run as fast)."""
    index: dict[str, int] = {}

    def ref(name: str) -> int:
        return index.setdefault(name, len(index)) if name else -1

    inputs = [(ref(v.name), _value_type(v)) for v in graph.input]
    initializers = [(ref(t.name), t.data_type, list(t.dims)) for t in graph.initializer]
    nodes = [
        (
            n.domain,
            n.op_type,
            [ref(name) for name in n.input],
            [ref(name) for name in n.output],
            sorted(_attribute_signature(a) for a in n.attribute),
        )
        for n in graph.node
    ]
    outputs = [ref(v.name) for v in graph.output]
    return [inputs, initializers, nodes, outputs]


def environment(threads: int) -> dict:
    """What else the timing depends on: runtime, providers, threads and how idle pool threads
    wait, machine."""
    return {
        "onnxruntime": ort.__version__,
        "providers": list(PROVIDERS),
        "threads": threads,
        "spinning": benchmark.DEFAULT_SPINNING,
        "machine": machine(),
    }


def machine() -> list:
    """The machine this process runs on, which the keys name: on a cluster the worker's that
    ran the timing job, not the driver's. Host name, architecture, CPU model, CPU count."""
    return [platform.node(), platform.machine(), _processor(), os.cpu_count()]


def _attribute_signature(attribute: onnx.AttributeProto) -> list:
    kind = attribute.type
    if kind == onnx.AttributeProto.TENSOR:
        return [attribute.name, "tensor", attribute.t.data_type, list(attribute.t.dims)]
    if kind == onnx.AttributeProto.GRAPH:
        return [attribute.name, "graph", graph_signature(attribute.g)]
    if kind == onnx.AttributeProto.GRAPHS:
        return [attribute.name, "graphs", [graph_signature(g) for g in attribute.graphs]]
    if kind == onnx.AttributeProto.TENSORS:
        return [attribute.name, "tensors", [[t.data_type, list(t.dims)] for t in attribute.tensors]]
    return [attribute.name, str(onnx.helper.get_attribute_value(attribute))]


def _value_type(value: onnx.ValueInfoProto) -> list:
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
    return [tensor.elem_type, dims]


def _processor() -> str:
    """The CPU model (platform.processor() is often empty or just the architecture on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _describe(model: onnx.ModelProto) -> str:
    """For a person reading the cache file: the model's ops."""
    return " ".join(node.op_type for node in model.graph.node)[:200]
