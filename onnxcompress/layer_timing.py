"""Time one layer against its rewrite in onnxruntime: both as small one-input models of the
layer's real input shape, same session options, interleaved runs. Results are cached by the
layer's shapes and attributes, so identical layers are timed once per process."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress import benchmark

# (threads, original node signature, rewrite signature) -> timing
_CACHE: dict[tuple, dict[str, float]] = {}
REPEATS = 20
MIN_SECONDS = 0.05


def compare_layer(
    constants: dict[str, np.ndarray], layer: Any, rewrite: Any, threads: int = 2
) -> dict[str, float]:
    """{"original_ms", "rewritten_ms", "speedup"} for `layer` alone versus `rewrite` alone.

    `constants` are the original model's (`graph.constant_tensors`), for the layer's weights.
    """
    # The activation is input 0, except for a constant-on-the-left product (W @ x).
    activation = getattr(layer, "activation", layer.node.input[0])
    weight_names = [name for name in layer.node.input if name and name != activation]
    dtype = constants[weight_names[0]].dtype
    weights = [numpy_helper.from_array(constants[name], name) for name in weight_names]
    before = _single_input_model([layer.node], weights, layer, activation, dtype)
    after = _single_input_model(rewrite.nodes, rewrite.initializers, layer, activation, dtype)
    key = (threads, _signature(before), _signature(after))
    if key not in _CACHE:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(layer.input_shape).astype(dtype)
        timings = benchmark.benchmark_models(
            {"original": before, "rewritten": after},
            {activation: x},
            threads=threads,
            warmup=3,
            repeats=REPEATS,
            min_seconds=MIN_SECONDS,
        )
        _CACHE[key] = {
            "original_ms": round(timings["original"]["median_ms"], 4),
            "rewritten_ms": round(timings["rewritten"]["median_ms"], 4),
            "speedup": round(benchmark.speedup(timings, "original", "rewritten"), 3),
        }
    return dict(_CACHE[key])


def _single_input_model(nodes, initializers, layer, activation, dtype) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info(activation, elem, layer.input_shape)
    y = helper.make_tensor_value_info(layer.node.output[0], elem, None)
    body = helper.make_graph(list(nodes), "layer", [x], [y], list(initializers))
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])


def _signature(model: onnx.ModelProto) -> tuple:
    """Ops, attributes and tensor shapes: what the runtime's speed depends on (not values)."""
    nodes = tuple((n.op_type, tuple(sorted(str(a) for a in n.attribute))) for n in model.graph.node)
    shapes = tuple(tuple(init.dims) for init in model.graph.initializer)
    inputs = tuple(
        tuple(d.dim_value for d in vi.type.tensor_type.shape.dim) for vi in model.graph.input
    )
    return nodes, shapes, inputs
