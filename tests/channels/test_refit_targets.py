"""Where a refit consumer is judged: its own output, or its residual Add and the Relu after."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import graph
from onnxcompress.channels.refit_targets import judged_at, tensor_shapes


def _residual_block() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), name)
        for name in ("wa", "wb")
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="a"),
        helper.make_node("Relu", ["a"], ["ra"], name="ra"),
        helper.make_node("Conv", ["ra", "wb"], ["b"], name="b"),
        helper.make_node("Add", ["x", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 5])
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_consumer_is_judged_after_its_residual_add_and_relu():
    model = _residual_block()
    constants = graph.constant_tensors(model)
    shapes = tensor_shapes(model, {"x": [2, 4, 5, 5]})
    a, b = model.graph.node[0], model.graph.node[2]
    assert judged_at(model, a, constants, shapes).__dict__ == {
        "target": "a",
        "offset": "",
        "rectified": True,
    }
    assert judged_at(model, b, constants, shapes).__dict__ == {
        "target": "s",
        "offset": "x",
        "rectified": True,
    }
    del model.graph.node[4]  # no Relu after the Add: judged at the Add, not rectified
    model.graph.output[0].name = "s"
    assert judged_at(model, b, constants, shapes).__dict__ == {
        "target": "s",
        "offset": "x",
        "rectified": False,
    }
