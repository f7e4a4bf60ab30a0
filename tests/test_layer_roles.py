"""Layer roles read off the graph: the first weighted layer, the last one named classifier only
when it feeds class scores with no other layer between; and the report's records carry them."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress.layer_roles import CLASSIFIER, FIRST, LAST, layer_roles
from onnxcompress.passkit import PassContext
from onnxcompress.pipeline import build_options, lookup_passes, run_passes
from onnxcompress.report import rows


def _model(out_dims: list, tail: str = "Gemm", names: bool = True) -> onnx.ModelProto:
    """x → Conv → Relu → Conv → GlobalAveragePool → Flatten → `tail` (Gemm, or MatMul with
    a computed weight) → y."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((4, 3, 3, 3)),
        "w2": rng.standard_normal((4, 4, 3, 3)),
        "w3": rng.standard_normal((4, 10)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv_in", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv_mid", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
    ]
    if tail == "Gemm":
        nodes.append(helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc"))
    else:  # a product whose weight is computed: not a layer with a fixed weight
        nodes.append(helper.make_node("Relu", ["w3"], ["w3_relu"], name="computed"))
        nodes.append(helper.make_node("MatMul", ["f", "w3_relu"], ["y"], name="fc"))
    if not names:
        for node in nodes:
            node.name = ""
    body = helper.make_graph(
        nodes,
        "roles",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_dims)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])


def test_first_layer_and_classifier():
    assert layer_roles(_model(["batch", 10])) == {"conv_in": FIRST, "fc": CLASSIFIER}


@pytest.mark.parametrize("dims", [["batch", 10, 3], ["batch", "classes"], ["batch", 1]])
def test_last_layer_whose_output_is_not_class_scores(dims):
    assert layer_roles(_model(dims))["fc"] == LAST


def test_a_product_with_a_computed_weight_between_is_no_classifier():
    # conv_mid is the last layer with a fixed weight, but another product follows it.
    assert layer_roles(_model(["batch", 10], tail="MatMul")) == {
        "conv_in": FIRST,
        "conv_mid": LAST,
    }


def test_nameless_nodes_under_every_name_a_record_gives_them():
    roles = layer_roles(_model(["batch", 10], names=False))
    # A record names a nameless node by its first output (int8, prune) or <op>_<index>.
    assert roles == {"c1": FIRST, "Conv_0": FIRST, "y": CLASSIFIER, "Gemm_5": CLASSIFIER}


def test_a_single_layer_is_both():
    model = _model(["batch", 10])
    del model.graph.node[:5]
    model.graph.node[0].input[0] = "x"
    model.graph.input[0].CopyFrom(
        helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    )
    assert layer_roles(model) == {"fc": f"{FIRST}, {CLASSIFIER}"}


def test_records_carry_the_roles_into_the_layer_table():
    model = _model(["batch", 10])
    specs = lookup_passes(["prune"])
    typed = build_options(specs, {"prune": {"sparsity": 0.5}})
    _, reports = run_passes(model, specs, typed, PassContext({"x": [1, 3, 8, 8]}), lambda _: None)
    roles = {r["node"]: r.get("role") for r in reports[0]["records"]}
    assert roles == {"conv_in": FIRST, "conv_mid": None, "fc": CLASSIFIER}
    column = rows.LAYER_COLUMNS.index("role")
    table = {row[1]: row[column] for row in rows.layer_rows({"passes": reports})}
    assert table == {"conv_in": FIRST, "conv_mid": "", "fc": CLASSIFIER}


def test_an_int8_model_s_layers_keep_their_roles():
    """int8 records name the nodes of the quantized model, whose weights are dequantized."""
    model = _model(["batch", 10])
    specs = lookup_passes(["int8"])
    typed = build_options(specs, {"int8": {"time_layers": False}})
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    context = PassContext({"x": [4, 3, 8, 8]}, calibration=[{"x": x}])
    _, reports = run_passes(model, specs, typed, context, lambda _: None)
    roles = {r["node"]: r.get("role") for r in reports[0]["records"]}
    assert roles == {"conv_in": FIRST, "conv_mid": None, "fc": CLASSIFIER}
