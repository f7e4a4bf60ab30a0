"""runtime.capture: intermediate tensors exposed and handed over batch by batch, equal to the
arithmetic they stand for."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.runtime import capture


def test_capture_hands_over_intermediate_tensors_per_batch():
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("ReduceSum", ["r"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((n, 4)).astype(np.float32)} for n in (2, 5)]
    seen = list(capture(model, ["h", "r"], batches, threads=1))
    assert [batch is given for (batch, _), given in zip(seen, batches, strict=True)] == [True] * 2
    for batch, values in seen:
        np.testing.assert_allclose(values["h"], batch["x"] @ w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values["r"], np.maximum(batch["x"] @ w, 0), rtol=1e-5, atol=1e-6)
    assert len(model.graph.output) == 1, "the model given is left as it was"
