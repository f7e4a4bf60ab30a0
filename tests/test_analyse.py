"""analyse: exact MACs and params on tiny hand-built models, then the shared real models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxcompress.analyse import analyse, flops_by_node, format_table, human
from onnxcompress.errors import CompressError

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
PINS = {"ppocr_mobile_v2.0_cls": {"x": [1, 3, 48, 192]}, "silero_vad_16k_op15": {"input": [1, 512]}}
FLOAT = TensorProto.FLOAT


def weight(name: str, shape, dtype=np.float32) -> onnx.TensorProto:
    values = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return numpy_helper.from_array(values, name)


def make_model(nodes, inputs, initializers=(), opset=17, ir_version=None, outputs=("Y",)):
    """inputs: (name, shape) float tensors, or (name, shape, elem_type); outputs get the type
    of the first input."""
    types = [i[2] if len(i) > 2 else FLOAT for i in inputs]
    graph_inputs = [
        helper.make_tensor_value_info(i[0], t, i[1]) for i, t in zip(inputs, types, strict=True)
    ]
    graph_outputs = [helper.make_tensor_value_info(name, types[0], None) for name in outputs]
    graph = helper.make_graph(nodes, "g", graph_inputs, graph_outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def single(model, name="n", input_shapes=None):
    return analyse(model, input_shapes).by_name()[name]


# --- Conv: every attribute variant --------------------------------------------------------

CONV_CASES = {
    # id: (X shape, W shape, attributes, output shape, MACs written out by hand)
    "stride2_batch2": (
        [2, 3, 32, 32],
        [8, 3, 3, 3],
        dict(strides=[2, 2], pads=[1, 1, 1, 1]),
        [2, 8, 16, 16],
        2 * 8 * 16 * 16 * 3 * 3 * 3,
    ),
    "dilation2": (
        [1, 3, 32, 32],
        [8, 3, 3, 3],
        dict(dilations=[2, 2]),
        [1, 8, 28, 28],
        1 * 8 * 28 * 28 * 3 * 3 * 3,
    ),  # effective kernel 5
    "asymmetric_pads": (
        [1, 3, 32, 32],
        [8, 3, 3, 3],
        dict(pads=[0, 1, 2, 3]),  # top, left, bottom, right
        [1, 8, 32, 34],  # H: 32+0+2-3+1, W: 32+1+3-3+1
        1 * 8 * 32 * 34 * 3 * 3 * 3,
    ),
    "same_upper_stride2": (
        [1, 3, 31, 31],
        [8, 3, 3, 3],
        dict(auto_pad="SAME_UPPER", strides=[2, 2]),
        [1, 8, 16, 16],
        1 * 8 * 16 * 16 * 3 * 3 * 3,
    ),  # ceil(31/2)
    "kernel_3x5": ([1, 3, 20, 30], [8, 3, 3, 5], {}, [1, 8, 18, 26], 1 * 8 * 18 * 26 * 3 * 3 * 5),
    "groups2": (
        [1, 4, 16, 16],
        [8, 2, 3, 3],
        dict(group=2, pads=[1, 1, 1, 1]),
        [1, 8, 16, 16],
        1 * 8 * 16 * 16 * 2 * 3 * 3,
    ),  # C_in/groups = 2
    "depthwise": (
        [1, 8, 16, 16],
        [8, 1, 3, 3],
        dict(group=8, pads=[1, 1, 1, 1]),
        [1, 8, 16, 16],
        1 * 8 * 16 * 16 * 1 * 3 * 3,
    ),
    "conv1d": ([1, 4, 100], [6, 4, 5], {}, [1, 6, 96], 1 * 6 * 96 * 4 * 5),
    "conv3d": (
        [1, 2, 8, 8, 8],
        [4, 2, 3, 3, 3],
        dict(pads=[1] * 6),
        [1, 4, 8, 8, 8],
        1 * 4 * 8 * 8 * 8 * 2 * 3 * 3 * 3,
    ),
}


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_macs_exact(case):
    x_shape, w_shape, attrs, out_shape, macs = case
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="n", **attrs)
    stats = single(make_model([node], [("X", x_shape)], [weight("W", w_shape)]))
    assert stats.output_shapes == [out_shape]
    assert stats.macs == macs
    assert stats.params == int(np.prod(w_shape))
    assert stats.weight_inputs == ["W"]
    assert stats.output_bytes == 4 * int(np.prod(out_shape))


def test_conv_bias_adds_params_not_macs():
    inits = [weight("W", [8, 3, 3, 3]), weight("B", [8])]
    with_bias = helper.make_node("Conv", ["X", "W", "B"], ["Y"], name="n")
    stats = single(make_model([with_bias], [("X", [1, 3, 10, 10])], inits))
    assert stats.macs == 1 * 8 * 8 * 8 * 3 * 3 * 3
    assert stats.params == 8 * 3 * 3 * 3 + 8
    assert stats.weight_inputs == ["W", "B"]


@pytest.mark.parametrize("group,w_shape,c_out", [(1, [8, 4, 3, 3], 4), (2, [8, 2, 3, 3], 4)])
def test_conv_transpose_stride2(group, w_shape, c_out):
    node = helper.make_node(
        "ConvTranspose", ["X", "W"], ["Y"], name="n", strides=[2, 2], group=group
    )
    stats = single(make_model([node], [("X", [1, 8, 8, 8])], [weight("W", w_shape)]))
    assert stats.output_shapes == [[1, c_out, 17, 17]]  # (8 - 1) * 2 + 3
    # input elements × C_out/groups × kh × kw
    assert stats.macs == (1 * 8 * 8 * 8) * (c_out // group) * 3 * 3


# --- Gemm and MatMul ----------------------------------------------------------------------


def test_gemm_trans_alpha_beta():
    node = helper.make_node(
        "Gemm", ["A", "B", "C"], ["Y"], name="n", transA=1, transB=1, alpha=0.5, beta=2.0
    )
    inits = [weight("B", [16, 32]), weight("C", [16])]
    stats = single(make_model([node], [("A", [32, 4])], inits))  # A^T is [M=4, K=32]
    assert stats.output_shapes == [[4, 16]]
    assert stats.macs == 4 * 16 * 32
    assert stats.params == 16 * 32 + 16

    plain = helper.make_node("Gemm", ["A", "B"], ["Y"], name="n")
    stats = single(make_model([plain], [("A", [4, 32])], [weight("B", [32, 16])]))
    assert stats.macs == 4 * 16 * 32


def test_matmul_batched_constant_right():
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="n")
    stats = single(make_model([node], [("X", [2, 4, 16, 32])], [weight("W", [32, 8])]))
    assert stats.output_shapes == [[2, 4, 16, 8]]
    assert stats.macs == 2 * 4 * 16 * 8 * 32
    assert (stats.params, stats.weight_inputs) == (32 * 8, ["W"])


def test_matmul_constant_left_broadcast():
    node = helper.make_node("MatMul", ["W", "X"], ["Y"], name="n")
    stats = single(make_model([node], [("X", [3, 16, 32])], [weight("W", [8, 16])]))
    assert stats.output_shapes == [[3, 8, 32]]
    assert stats.macs == 3 * 8 * 32 * 16
    assert (stats.params, stats.weight_inputs) == (8 * 16, ["W"])


def test_matmul_two_activations_has_no_params():
    node = helper.make_node("MatMul", ["A", "B"], ["Y"], name="n")
    stats = single(make_model([node], [("A", [2, 5, 7]), ("B", [2, 7, 3])]))
    assert (stats.macs, stats.params, stats.weight_inputs) == (2 * 5 * 3 * 7, 0, [])


# --- where the weights live ---------------------------------------------------------------


def _weights_as(kind: str) -> onnx.ModelProto:
    # Conv [1,3,12,12] -> [1,8,10,10]; Reshape -> [1,10,80]; MatMul [8,10] @ that -> [1,8,80]
    w_conv, w_mm = weight("Wc", [8, 3, 3, 3]), weight("Wm", [8, 10])
    shape = numpy_helper.from_array(np.array([1, 10, 80], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["X", "Wc"], ["H"], name="conv"),
        helper.make_node("Reshape", ["H", "shape"], ["F"], name="flat"),
        helper.make_node("MatMul", ["Wm", "F"], ["Y"], name="mm"),
    ]
    inputs = [("X", [1, 3, 12, 12])]
    if kind == "initializer":
        return make_model(nodes, inputs, [w_conv, w_mm, shape])
    if kind == "constant_node":
        constants = [
            helper.make_node("Constant", [], [t.name], name=f"c_{t.name}", value=t)
            for t in (w_conv, w_mm, shape)
        ]
        return make_model(constants + nodes, inputs)
    # Old exporters (IR 3) list every initializer among the graph inputs too.
    listed = inputs + [(t.name, list(t.dims), t.data_type) for t in (w_conv, w_mm, shape)]
    return make_model(nodes, listed, [w_conv, w_mm, shape], opset=8, ir_version=3)


def test_weights_in_initializer_constant_node_or_graph_input_agree():
    results = {
        kind: analyse(_weights_as(kind)) for kind in ("initializer", "constant_node", "graph_input")
    }
    for analysis in results.values():
        nodes = analysis.by_name()
        assert nodes["conv"].macs == 1 * 8 * 10 * 10 * 3 * 3 * 3
        assert nodes["mm"].output_shapes == [[1, 8, 80]]
        assert nodes["mm"].macs == 1 * 8 * 80 * 10
        assert nodes["conv"].params == 8 * 3 * 3 * 3
        assert nodes["mm"].params == 8 * 10
        assert nodes["flat"].params == 0  # the int64 shape is not a weight
        assert analysis.total_params == 8 * 3 * 3 * 3 + 8 * 10
        assert analysis.weight_bytes == 4 * analysis.total_params
        assert analysis.input_shapes == {"X": [1, 3, 12, 12]}
    assert results["constant_node"].by_name()["c_Wc"].params == 0  # counted where it is read


def test_shared_weight_counted_once_in_total():
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["H"], name="a"),
        helper.make_node("MatMul", ["H", "W"], ["Y"], name="b"),
    ]
    analysis = analyse(make_model(nodes, [("X", [4, 16])], [weight("W", [16, 16])]))
    assert [n.params for n in analysis.nodes] == [256, 256]
    assert analysis.total_params == 256
    assert analysis.total_macs == 2 * 4 * 16 * 16


def test_fp16_weights_count_two_bytes():
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="n")
    model = make_model(
        [node], [("X", [1, 3, 8, 8], TensorProto.FLOAT16)], [weight("W", [4, 3, 3, 3], np.float16)]
    )
    analysis = analyse(model)
    assert analysis.total_params == 4 * 3 * 3 * 3
    assert analysis.weight_bytes == 2 * 4 * 3 * 3 * 3
    assert analysis.nodes[0].output_bytes == 2 * 1 * 4 * 6 * 6


# --- recurrent, pooling, element-wise, data movement --------------------------------------


def test_lstm_bidirectional():
    seq, batch, inp, hidden = 5, 2, 10, 16
    node = helper.make_node(
        "LSTM", ["X", "W", "R", "B"], ["Y"], name="n", hidden_size=hidden, direction="bidirectional"
    )
    inits = [
        weight("W", [2, 4 * hidden, inp]),
        weight("R", [2, 4 * hidden, hidden]),
        weight("B", [2, 8 * hidden]),
    ]
    stats = single(make_model([node], [("X", [seq, batch, inp])], inits))
    assert stats.output_shapes == [[seq, 2, batch, hidden]]
    assert stats.macs == seq * batch * 4 * hidden * (inp + hidden) * 2
    assert stats.params == 2 * 64 * 10 + 2 * 64 * 16 + 2 * 128


@pytest.mark.parametrize("op,gates", [("GRU", 3), ("RNN", 1)])
def test_gru_rnn_gates(op, gates):
    node = helper.make_node(op, ["X", "W", "R"], ["Y"], name="n", hidden_size=16)
    inits = [weight("W", [1, gates * 16, 10]), weight("R", [1, gates * 16, 16])]
    stats = single(make_model([node], [("X", [5, 2, 10])], inits))
    assert stats.macs == 5 * 2 * gates * 16 * (10 + 16)


def test_lstm_batch_first_layout():
    node = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], name="n", hidden_size=16, layout=1)
    inits = [weight("W", [1, 64, 10]), weight("R", [1, 64, 16])]
    stats = single(make_model([node], [("X", [2, 5, 10])], inits))  # [batch, seq, input]
    assert stats.macs == 5 * 2 * 64 * (10 + 16)


def test_pooling_elementwise_and_data_movement():
    nodes = [
        helper.make_node("MaxPool", ["X"], ["P"], name="pool", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["X"], ["R"], name="relu"),
        helper.make_node("GlobalAveragePool", ["R"], ["G"], name="gap"),
        helper.make_node("Reshape", ["G", "shape"], ["Y"], name="reshape"),
    ]
    shape = numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "shape")
    analysis = analyse(make_model(nodes, [("X", [1, 8, 16, 16])], [shape]))
    nodes = analysis.by_name()
    assert nodes["pool"].output_shapes == [[1, 8, 7, 7]]
    assert nodes["pool"].macs == 1 * 8 * 7 * 7 * 3 * 3
    assert nodes["relu"].macs == 1 * 8 * 16 * 16
    assert nodes["gap"].macs == 1 * 8 * 16 * 16  # every input element
    assert nodes["reshape"].macs == 0
    assert analysis.macs_by_op()["MaxPool"] == nodes["pool"].macs


# --- names, input shapes, unknown shapes --------------------------------------------------


def test_unnamed_nodes_get_stable_names_and_model_is_untouched():
    nodes = [helper.make_node("Relu", ["X"], ["H"]), helper.make_node("Relu", ["H"], ["Y"])]
    model = make_model(nodes, [("X", [1, 4])])
    before = model.SerializeToString()
    assert [n.name for n in analyse(model).nodes] == ["Relu_0", "Relu_1"]
    assert flops_by_node(model) == {"Relu_0": 4, "Relu_1": 4}
    assert model.SerializeToString() == before


def _dynamic_conv() -> onnx.ModelProto:
    node = helper.make_node("Conv", ["X", "W"], ["Y"], name="n", pads=[1, 1, 1, 1])
    return make_model([node], [("X", ["N", 3, "H", "W"])], [weight("W", [8, 3, 3, 3])])


def test_dynamic_dims_need_pins():
    with pytest.raises(CompressError, match=r"'X'.*--input-shape X:"):
        analyse(_dynamic_conv())
    stats = single(_dynamic_conv(), input_shapes={"X": [2, 3, 20, 24]})
    assert stats.output_shapes == [[2, 8, 20, 24]]
    assert stats.macs == 2 * 8 * 20 * 24 * 3 * 3 * 3


def _unknown_op_model() -> onnx.ModelProto:
    # onnx cannot shape com.microsoft ops; onnxruntime can.
    nodes = [
        helper.make_node("Gelu", ["X"], ["G"], name="gelu", domain="com.microsoft"),
        helper.make_node("Relu", ["G"], ["Y"], name="n"),
    ]
    model = make_model(nodes, [("X", [2, 8, 16])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_unknown_shape_without_fallback_is_noted():
    analysis = analyse(_unknown_op_model(), runtime_fallback=False)
    relu = analysis.by_name()["n"]
    assert (relu.macs, relu.note) == (0, "shape unknown")
    assert analysis.by_name()["gelu"].note.startswith("shape unknown")


def test_unknown_shapes_come_from_onnxruntime():
    analysis = analyse(_unknown_op_model())
    assert analysis.by_name()["n"].macs == 2 * 8 * 16
    assert analysis.by_name()["n"].note == ""
    assert "no MAC formula for com.microsoft.Gelu" in analysis.by_name()["gelu"].note


def test_data_dependent_shape_from_one_onnxruntime_run():
    # Expand's target shape is a runtime input: only running the model tells the output shape.
    nodes = [
        helper.make_node("Expand", ["X", "s"], ["E"], name="expand"),
        helper.make_node("Relu", ["E"], ["Y"], name="n"),
    ]
    model = make_model(nodes, [("X", [1, 3]), ("s", [2], TensorProto.INT64)])
    stats = single(model)
    assert (stats.output_shapes, stats.macs, stats.note) == ([[1, 3]], 3, "")


# --- output: dict, table, human numbers ---------------------------------------------------


def test_to_dict_is_json_ready():
    analysis = analyse(_weights_as("initializer"))
    data = json.loads(json.dumps(analysis.to_dict()))
    assert data["total_macs"] == analysis.total_macs
    assert data["total_flops"] == 2 * analysis.total_macs
    assert data["total_params"] == analysis.total_params
    assert [n["name"] for n in data["nodes"]] == ["conv", "flat", "mm"]
    assert data["nodes"][0]["output_shapes"] == [[1, 8, 10, 10]]


def test_format_table_rows_and_totals():
    analysis = analyse(_weights_as("initializer"))
    console = Console(record=True, width=200)
    console.print(format_table(analysis))
    text = console.export_text()
    for name in ("conv", "flat", "mm", "total", "100.0%", "1×8×10×10"):
        assert name in text
    console = Console(record=True, width=200)
    console.print(format_table(analysis, top=1))
    text = console.export_text()
    assert "conv" in text and "mm" not in text and "2 more nodes" in text


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0"),
        (999, "999"),
        (1000, "1.0K"),
        (1_234_567, "1.2M"),
        (41_200_000, "41.2M"),
        (3_100_000_000, "3.1G"),
        (999_960, "1.0M"),
        (-2500, "-2.5K"),
    ],
)
def test_human(n, text):
    assert human(n) == text


# --- shared real models -------------------------------------------------------------------


def shared_model(stem: str) -> onnx.ModelProto:
    path = SHARED_MODELS / f"{stem}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return onnx.load(str(path))


def model_initializers(stem: str) -> list[onnx.TensorProto]:
    return [t for t in shared_model(stem).graph.initializer if t.data_type == TensorProto.FLOAT]


SHARED_STEMS = sorted(p.stem for p in SHARED_MODELS.glob("*.onnx")) or ["<none>"]


@pytest.mark.parametrize("stem", SHARED_STEMS)
def test_shared_models_analyse(stem):
    model = shared_model(stem)
    analysis = analyse(model, PINS.get(stem))
    assert analysis.total_macs > 0
    assert analysis.total_params > 0
    assert not [n.name for n in analysis.nodes if "shape unknown" in n.note]
    json.dumps(analysis.to_dict())


def test_resnet20_matches_hand_count():
    analysis = analyse(shared_model("resnet20_cifar10"))
    # 3x3 convs (pads 1): stem 3->16 at 32x32; stage 1 six 16->16 at 32x32; stages 2 and 3
    # open with a stride-2 conv (16->32 at 16x16, 32->64 at 8x8) then five c->c convs, plus a
    # 1x1 stride-2 projection shortcut each; then fc 64->10.
    stem = 32 * 32 * 16 * 3 * 9
    stage1 = 6 * 32 * 32 * 16 * 16 * 9
    stage2 = 16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9 + 16 * 16 * 32 * 16
    stage3 = 8 * 8 * 64 * 32 * 9 + 5 * 8 * 8 * 64 * 64 * 9 + 8 * 8 * 64 * 32
    fc = 64 * 10
    by_op = analysis.macs_by_op()
    assert by_op["Conv"] == stem + stage1 + stage2 + stage3 == 40_812_544
    assert by_op["Gemm"] == fc
    # one MAC per output element: 19 ReLUs, 9 residual Adds; GAP reads 64x8x8
    relus = 16 * 32 * 32 + 6 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8)
    adds = 3 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8)
    assert analysis.total_macs == 40_812_544 + fc + relus + adds + 64 * 8 * 8 == 41_091_712

    # params: conv weights + one bias per conv (BN folded by the exporter) + fc
    weights = (
        3 * 16 * 9
        + 6 * 16 * 16 * 9
        + (16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32)
        + (32 * 64 * 9 + 5 * 64 * 64 * 9 + 32 * 64)
    )
    biases = 16 + 6 * 16 + 7 * 32 + 7 * 64
    listed = sum(int(np.prod(t.dims)) for t in model_initializers("resnet20_cifar10"))
    assert analysis.total_params == weights + biases + 64 * 10 + 10 == listed == 271_690


def test_squeezenet_fp16_params_and_bytes():
    analysis = analyse(shared_model("squeezenet1.0_fp16"))
    assert analysis.total_params == 1_235_496
    assert analysis.weight_bytes == 2 * 1_235_496


def test_ppocr_weights_in_constant_nodes():
    model = shared_model("ppocr_mobile_v2.0_cls")
    analysis = analyse(model, PINS["ppocr_mobile_v2.0_cls"])
    floats = [
        numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute[0].t.data_type == TensorProto.FLOAT
    ]
    assert analysis.total_params == sum(a.size for a in floats) > 100_000
