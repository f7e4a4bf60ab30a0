"""Time one layer against its rewrite in onnxruntime: both as small one-input models of the
layer's real input shape, same session options, interleaved runs when both are timed. Medians
are kept in the persistent latency cache (`latency_cache`), keyed by shapes, attributes,
threads and machine: identical layers are timed once, and again only on another machine or
runtime. A cache hit for one side means the two were timed at different moments.

`time_candidates` times one layer against all its candidates as one job: it carries the layer,
the rewrites' shapes and the session settings, so an executor may run it on another machine
(a cluster's worker, the kind the model will run on); the cache there keys on that machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.auto import latency_cache as latency_cache
from onnxcompress.benchmark import DEFAULT_SPINNING
from onnxcompress.errors import CompressError

REPEATS = 20
MIN_SECONDS = 0.05
# The graph optimisation level of every timing session (`benchmark.timing_session`).
TIMING_OPTIMIZATION = "all"


def compare_layer(
    constants: dict[str, np.ndarray],
    layer: Any,
    rewrite: Any,
    threads: int = 2,
    cache: latency_cache.LatencyCache | None = None,
    quantize=None,
) -> dict[str, float]:
    """{"original_ms", "rewritten_ms", "speedup"} for `layer` alone versus `rewrite` alone.

    `constants` are the original model's (`graph.constant_tensors`), for the layer's weights;
    `cache` defaults to `latency_cache.default_cache()`; `quantize(model, feeds)`, when given,
    turns both into int8 models before they are timed (only when the cache lacks them: their
    timings are keyed by the float model and "int8").
    """
    before, feeds = layer_alone(constants, layer)
    ((activation, x),) = feeds.items()
    after = _single_input_model(rewrite.nodes, rewrite.initializers, layer, activation, x.dtype)
    prepare = None if quantize is None else (lambda model: quantize(model, feeds))
    medians = latency_cache.time_subgraphs(
        {"original": before, "rewritten": after},
        feeds,
        threads=threads,
        cache=cache,
        repeats=REPEATS,
        min_seconds=MIN_SECONDS,
        prepare=prepare,
        variant="" if quantize is None else "int8",
    )
    return _timing(medians["original"], medians["rewritten"])


def float_and_int8(
    constants: dict[str, np.ndarray],
    layer: Any,
    quantize,
    threads: int = 2,
    cache: latency_cache.LatencyCache | None = None,
) -> dict[str, float]:
    """{"original_ms", "rewritten_ms", "speedup"} for `layer` alone in float against it alone
    as `quantize(model, feeds)` makes it (int8; alone, it also pays quantizing its input and
    dequantizing its output, which inside an int8 model it mostly does not), each net of one
    onnxruntime call's fixed cost, as a layer inside the model does not pay it."""
    model, feeds = layer_alone(constants, layer)
    overhead = call_overhead_ms(layer, next(iter(feeds.values())).dtype, threads, cache)
    medians = [
        latency_cache.time_subgraphs(
            {"layer": model}, feeds, threads, cache, REPEATS, MIN_SECONDS, prepare, variant
        )["layer"]
        for prepare, variant in ((None, ""), (lambda m: quantize(m, feeds), "int8"))
    ]
    return _timing(*(net_ms(ms, overhead) for ms in medians))


def layer_alone(constants: dict[str, np.ndarray], layer: Any) -> tuple[onnx.ModelProto, dict]:
    """The layer as a one-input model with its weights, and a seeded input of its shape."""
    # The activation is input 0, except for a constant-on-the-left product (W @ x).
    activation = getattr(layer, "activation", layer.node.input[0])
    weight_names = [name for name in layer.node.input if name and name != activation]
    dtype = constants[weight_names[0]].dtype
    weights = [numpy_helper.from_array(constants[name], name) for name in weight_names]
    model = _single_input_model([layer.node], weights, layer, activation, dtype)
    x = np.random.default_rng(0).standard_normal(layer.input_shape).astype(dtype)
    return model, {activation: x}


def _timing(original_ms: float, rewritten_ms: float) -> dict[str, float]:
    return {
        "original_ms": round(original_ms, 4),
        "rewritten_ms": round(rewritten_ms, 4),
        "speedup": round(original_ms / rewritten_ms, 3),
    }


def call_overhead_ms(layer: Any, dtype, threads: int = 2, cache=None) -> float:
    """Median ms of one onnxruntime call on a model that only copies the layer's input
    (Identity): the fixed cost every one-layer timing above carries. In the whole graph a
    layer does not pay it, so costs that are added up over layers should subtract it."""
    activation = getattr(layer, "activation", layer.node.input[0])
    node = helper.make_node("Identity", [activation], [layer.node.output[0]])
    model = _single_input_model([node], [], layer, activation, dtype)
    feeds = {activation: np.zeros(layer.input_shape, dtype)}
    return latency_cache.time_subgraphs(
        {"overhead": model}, feeds, threads, cache, REPEATS, MIN_SECONDS
    )["overhead"]


# A layer's net latency is never counted below this (ms): timing noise can exceed it.
MIN_NET_MS = 1e-4


def net_ms(ms: float, overhead: float) -> float:
    """A layer's time alone less one call's fixed cost (`call_overhead_ms`), at least
    MIN_NET_MS."""
    return max(ms - overhead, MIN_NET_MS)


@dataclass(frozen=True)
class TimingJob:
    """One layer (named `layer`) and its candidates to time alone. `layers` maps a method to
    the layer as that method sees it, `weights` holds the layer's constants, `candidates`
    lists (method, measured rewrite: serialized nodes and initializer shapes, see
    `stand_in`). The sessions' settings: `threads`, and `optimization` and `spinning`, which
    the timing code fixes (checked against the worker's: a worker of another onnxcompress
    version must not time otherwise). `quantize(model, feeds)`: time int8 models instead; a
    local callable, for jobs run here."""

    layer: str
    layers: dict[str, Any] = field(repr=False)
    weights: dict[str, np.ndarray] = field(repr=False)
    candidates: list[tuple[str, Any]] = field(repr=False)
    threads: int = 2
    optimization: str = TIMING_OPTIMIZATION
    spinning: str = DEFAULT_SPINNING
    quantize: Any = field(default=None, repr=False)


@dataclass
class LayerTimes:
    """What a timing job found: the layer's net ms, each candidate's net ms (in the job's
    order), and the machine that timed them (`latency_cache.machine`)."""

    keep_ms: float
    candidate_ms: list[float]
    machine: list


def time_candidates(job: TimingJob) -> LayerTimes:
    """Every candidate of `job` against its layer, net of one call's fixed cost."""
    here = (TIMING_OPTIMIZATION, DEFAULT_SPINNING)
    if (job.optimization, job.spinning) != here:
        raise CompressError(
            f"timing job of {job.layer} asks for sessions {job.optimization}/{job.spinning}, "
            f"this worker's onnxcompress times with {here[0]}/{here[1]}: install the same "
            "version on every node"
        )
    first = next(iter(job.layers.values()))
    overhead = call_overhead_ms(first, first.weight.dtype, job.threads)
    keep_ms, found = 0.0, []
    for method, measured in job.candidates:
        timing = compare_layer(
            job.weights, job.layers[method], stand_in(measured), job.threads,
            quantize=job.quantize,
        )  # fmt: skip
        keep_ms = net_ms(timing["original_ms"], overhead)
        found.append(net_ms(timing["rewritten_ms"], overhead))
    return LayerTimes(keep_ms, found, latency_cache.machine())


def stand_in(measured: Any) -> Any:
    """A rewrite with the nodes of `measured` (a sensitivity.Measured) and seeded random
    weights of its initializers' shapes: speed depends on shapes, not values."""
    rng = np.random.default_rng(0)
    nodes = []
    for blob in measured.nodes:
        node = onnx.NodeProto()
        node.ParseFromString(blob)
        nodes.append(node)
    inits = []
    for name, dims, elem in measured.initializers:
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if np.issubdtype(dtype, np.floating):
            value = (0.1 * rng.standard_normal(dims)).astype(dtype)
        else:
            value = np.zeros(dims, dtype)  # indices (lrs's Gather): zeros are valid ones
        inits.append(numpy_helper.from_array(value, name))
    return _Rewrite(nodes, inits)


@dataclass
class _Rewrite:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]


def _single_input_model(nodes, initializers, layer, activation, dtype) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info(activation, elem, layer.input_shape)
    y = helper.make_tensor_value_info(layer.node.output[0], elem, None)
    body = helper.make_graph(list(nodes), "layer", [x], [y], list(initializers))
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])
