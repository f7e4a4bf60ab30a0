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


def _two_input_model():
    """h = x @ w; y = relu(h) + z: h needs only x and w."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Add", ["r", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.ones(3, np.float32), "unused"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def test_expose_only_cuts_the_graph_to_what_the_tensor_needs():
    from onnxcompress.runtime import expose_only, make_session, run_session

    model, w = _two_input_model()
    cut = expose_only(model, ["h"])
    assert [n.op_type for n in cut.graph.node] == ["MatMul"]
    assert [i.name for i in cut.graph.input] == ["x"] and [
        i.name for i in cut.graph.initializer
    ] == ["w"]
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (h,) = run_session(make_session(cut), {"x": x, "z": np.zeros((2, 3), np.float32)})
    np.testing.assert_allclose(h, x @ w, rtol=1e-5, atol=1e-6)
    assert len(model.graph.node) == 3  # the model handed in is untouched


def test_expose_only_keeps_graphs_with_subgraphs_whole():
    from onnxcompress.runtime import expose_only

    model, _ = _two_input_model()
    branch = helper.make_graph(
        [helper.make_node("Identity", ["r"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    model.graph.node.append(
        helper.make_node("If", ["flag"], ["out"], then_branch=branch, else_branch=branch)
    )
    cut = expose_only(model, ["h"])
    assert len(cut.graph.node) == 4 and [o.name for o in cut.graph.output] == ["h"]
