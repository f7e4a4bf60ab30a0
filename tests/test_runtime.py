"""runtime.capture: intermediate tensors exposed and handed over batch by batch, equal to the
arithmetic they stand for."""

import numpy as np
import pytest
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


def _add_if(model) -> None:
    """An If node whose branches read the outer tensor r."""
    branch = helper.make_graph(
        [helper.make_node("Identity", ["r"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    model.graph.node.append(
        helper.make_node("If", ["flag"], ["out"], then_branch=branch, else_branch=branch)
    )


def test_expose_only_keeps_graphs_with_subgraphs_whole():
    from onnxcompress.runtime import expose_only

    model, _ = _two_input_model()
    _add_if(model)
    cut = expose_only(model, ["h"])
    assert len(cut.graph.node) == 4 and [o.name for o in cut.graph.output] == ["h"]


def _branching_model(ir_version: int = 8):
    """a = x @ w; y1 = relu(a) + z; y2 = x @ v (y2 does not depend on a)."""
    rng = np.random.default_rng(2)
    w, v = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(2))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "z"], ["y1"], name="add"),
        helper.make_node("MatMul", ["x", "v"], ["y2"], name="side"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3]),
    ]
    if ir_version < 4:  # old exporters list the weights among the inputs
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 3]) for n in "wv"]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 3]) for n in ("y1", "y2")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = ir_version
    return model


@pytest.mark.parametrize("ir_version", [3, 8])
def test_downstream_cut_runs_what_the_node_reaches_from_upstream_tensors(ir_version):
    from onnxcompress.runtime import (
        downstream_cut,
        expose_outputs,
        make_session,
        run_session,
        type_inputs,
    )  # fmt: skip

    model = _branching_model(ir_version)
    cut, frontier = downstream_cut(model, "relu")
    assert frontier == ["a", "z"]
    assert [n.name for n in cut.graph.node] == ["relu", "add"]
    assert [o.name for o in cut.graph.output] == ["y1"]  # y2 cannot change: not computed
    rng = np.random.default_rng(3)
    batch = {n: rng.standard_normal((2, k)).astype(np.float32) for n, k in (("x", 4), ("z", 3))}
    whole = run_session(make_session(expose_outputs(model, ["a"])), batch)  # y1, y2, a
    upstream = {**batch, "a": whole[-1]}
    type_inputs(cut, upstream)
    (part,) = run_session(make_session(cut), upstream)
    np.testing.assert_allclose(part, whole[0], rtol=1e-6)
    assert len(model.graph.node) == 4  # the model handed in is untouched


def test_downstream_cut_refuses_graphs_with_subgraphs():
    from onnxcompress.runtime import downstream_cut

    model = _branching_model()
    _add_if(model)
    with pytest.raises(ValueError, match="subgraphs"):
        downstream_cut(model, "relu")
