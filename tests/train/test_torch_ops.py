"""TorchGraph runs each op as onnxruntime does: one tiny model per op variant (every Conv and
ConvTranspose attribute, Gemm's transposes and scales, broadcasting, both forms of the ops
whose attributes became inputs, the opset-dependent Softmax), compared to rtol 1e-4."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxcompress.train import SUPPORTED_OPS, TorchGraph, UnsupportedOps, supported  # noqa: E402
from tests.train.torch_check import max_difference  # noqa: E402

RNG = np.random.default_rng(0)
ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def op_model(
    op: str,
    feeds: dict[str, np.ndarray],
    constants: dict[str, np.ndarray] | None = None,
    inputs: list[str] | None = None,
    opset: int = 17,
    outputs: int = 1,
    out_type: int = TensorProto.FLOAT,
    **attrs,
) -> onnx.ModelProto:
    """One `op` node reading `inputs` (default: the feeds, then the constants, in order);
    constants are initializers."""
    constants = constants or {}
    names = inputs if inputs is not None else [*feeds, *constants]
    out_names = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, names, out_names, **attrs)
    graph = helper.make_graph(
        [node],
        "op",
        [helper.make_tensor_value_info(n, ONNX_TYPES[v.dtype], v.shape) for n, v in feeds.items()],
        [helper.make_tensor_value_info(n, out_type, None) for n in out_names],
        [numpy_helper.from_array(v, n) for n, v in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def check(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    max_difference(model, feeds)


CONV_VARIANTS = [
    dict(strides=[2, 2]),
    dict(pads=[0, 1, 2, 1]),  # uneven: begin (0, 1), end (2, 1)
    dict(pads=[1, 1, 1, 1], dilations=[2, 1]),
    dict(group=2),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(auto_pad="VALID", strides=[1, 2]),
]


@pytest.mark.parametrize("attrs", CONV_VARIANTS, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_attributes(attrs, bias):
    group = attrs.get("group", 1)
    weight = {"w": normal(6, 4 // group, 3, 2)}  # non-square kernel
    constants = {**weight, **({"b": normal(6)} if bias else {})}
    feeds = {"x": normal(2, 4, 9, 8)}
    check(op_model("Conv", feeds, constants, **attrs), feeds)


def test_depthwise_conv_1d_and_3d_conv():
    feeds = {"x": normal(1, 4, 10)}
    check(op_model("Conv", feeds, {"w": normal(4, 1, 3)}, group=4, pads=[1, 0]), feeds)
    feeds = {"x": normal(1, 2, 5, 6, 4)}
    check(op_model("Conv", feeds, {"w": normal(3, 2, 3, 3, 1)}, strides=[1, 2, 1]), feeds)


CONV_TRANSPOSE_VARIANTS = [
    dict(strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(strides=[2, 2], output_padding=[1, 0], pads=[0, 1, 1, 0]),
    dict(strides=[2, 2], output_shape=[10, 9]),  # cuts an odd total
    dict(strides=[2, 2], output_shape=[12, 12]),  # past the full output
    dict(strides=[2, 2], output_shape=[10, 9], auto_pad="SAME_UPPER"),
    dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(strides=[2, 2], auto_pad="SAME_LOWER"),
    dict(strides=[2, 1], auto_pad="VALID", dilations=[2, 1]),
    dict(group=2),
]


@pytest.mark.parametrize("attrs", CONV_TRANSPOSE_VARIANTS, ids=str)
def test_conv_transpose_attributes(attrs):
    group = attrs.get("group", 1)
    feeds = {"x": normal(1, 4, 5, 5)}
    constants = {"w": normal(4, 6 // group, 3, 3), "b": normal(6)}
    check(op_model("ConvTranspose", feeds, constants, **attrs), feeds)


@pytest.mark.parametrize(
    "attrs", [{}, dict(transA=1), dict(transB=1, alpha=0.5, beta=2.0), dict(transA=1, transB=1)]
)
def test_gemm(attrs):
    a = normal(3, 5) if not attrs.get("transA") else normal(5, 3)
    b = normal(5, 4) if not attrs.get("transB") else normal(4, 5)
    feeds = {"a": a}
    check(op_model("Gemm", feeds, {"b": b, "c": normal(4)}, **attrs), feeds)
    check(op_model("Gemm", feeds, {"b": b}, opset=13, **attrs), feeds)  # no C


@pytest.mark.parametrize(
    ("left", "right"), [((2, 1, 3, 4), (5, 4, 6)), ((4,), (4, 3)), ((3, 4), (4,))]
)
def test_matmul_broadcasts(left, right):
    feeds = {"a": normal(*left)}
    check(op_model("MatMul", feeds, {"b": normal(*right)}), feeds)
    check(op_model("MatMul", feeds, {"b": normal(*right)}, inputs=["b", "a"][::-1]), feeds)


def test_matmul_with_the_weight_on_the_left():
    feeds = {"x": normal(2, 4, 5)}
    check(op_model("MatMul", feeds, {"w": normal(3, 4)}, inputs=["w", "x"]), feeds)


@pytest.mark.parametrize("op", ["Add", "Mul", "Sub", "Div", "Pow", "Max", "Min"])
def test_binary_ops_broadcast(op):
    feeds = {"a": np.abs(normal(2, 3, 4, 5)) + 0.5}
    check(op_model(op, feeds, {"b": normal(3, 1, 5)}), feeds)


def test_integer_div_truncates():
    feeds = {"a": ints(7, -7, 9, -9)}
    model = op_model("Div", feeds, {"b": ints(2, 2, -4, 4)}, out_type=TensorProto.INT64)
    check(model, feeds)


UNARY = ["Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Abs", "Neg", "HardSwish", "Softplus"]


@pytest.mark.parametrize("op", UNARY)
def test_unary_ops(op):
    feeds = {"x": normal(2, 3, 4)}
    check(op_model(op, feeds), feeds)


def test_activations_with_attributes():
    feeds = {"x": normal(2, 3, 4)}
    check(op_model("HardSigmoid", feeds, alpha=0.3, beta=0.4), feeds)
    check(op_model("LeakyRelu", feeds, alpha=0.2), feeds)
    check(op_model("Elu", feeds, alpha=0.7), feeds)
    check(op_model("PRelu", feeds, {"slope": normal(3, 1)}), feeds)
    check(op_model("Gelu", feeds, opset=20), feeds)
    check(op_model("Gelu", feeds, opset=20, approximate="tanh"), feeds)
    check(op_model("Sqrt", {"x": np.abs(feeds["x"])}), {"x": np.abs(feeds["x"])})


def test_clip_attribute_and_input_forms():
    feeds = {"x": normal(2, 8)}
    check(op_model("Clip", feeds, opset=6, min=-0.5, max=0.5), feeds)
    bounds = {"lo": np.array(-0.5, np.float32), "hi": np.array(0.6, np.float32)}
    check(op_model("Clip", feeds, bounds, opset=11), feeds)
    check(op_model("Clip", feeds, {"lo": bounds["lo"]}, opset=11), feeds)  # min only
    check(op_model("Clip", feeds, {"hi": bounds["hi"]}, inputs=["x", "", "hi"]), feeds)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_axis_follows_the_opset(op, opset):
    feeds = {"x": normal(2, 3, 4)}
    check(op_model(op, feeds, opset=opset, axis=1), feeds)
    check(op_model(op, feeds, opset=opset), feeds)


POOL_VARIANTS = [
    dict(kernel_shape=[3, 3], strides=[2, 2]),
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 2], pads=[0, 1, 2, 0], strides=[2, 1]),  # uneven
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
]


@pytest.mark.parametrize("attrs", POOL_VARIANTS, ids=str)
def test_max_pool(attrs):
    feeds = {"x": normal(1, 2, 9, 8)}
    check(op_model("MaxPool", feeds, **attrs), feeds)


def test_max_pool_dilations():
    feeds = {"x": normal(1, 2, 9, 8)}
    check(op_model("MaxPool", feeds, kernel_shape=[2, 2], dilations=[2, 2]), feeds)


@pytest.mark.parametrize("attrs", POOL_VARIANTS[:3], ids=str)
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_average_pool(attrs, count_include_pad):
    feeds = {"x": normal(1, 2, 9, 8)}
    check(op_model("AveragePool", feeds, count_include_pad=count_include_pad, **attrs), feeds)


def test_global_pools_and_norms():
    feeds = {"x": normal(2, 3, 5, 4)}
    check(op_model("GlobalAveragePool", feeds), feeds)
    check(op_model("GlobalMaxPool", feeds), feeds)
    stats = {"s": normal(3), "b": normal(3), "m": normal(3), "v": np.abs(normal(3)) + 0.1}
    check(op_model("BatchNormalization", feeds, stats, epsilon=1e-3), feeds)
    check(op_model("InstanceNormalization", feeds, {"s": normal(3), "b": normal(3)}), feeds)
    check(op_model("LayerNormalization", feeds, {"s": normal(4), "b": normal(4)}), feeds)
    check(op_model("LayerNormalization", feeds, {"s": normal(5, 4)}, axis=-2), feeds)


@pytest.mark.parametrize("axis", [0, 2, -1])
def test_flatten(axis):
    feeds = {"x": normal(2, 3, 4, 5)}
    check(op_model("Flatten", feeds, axis=axis), feeds)


@pytest.mark.parametrize("shape", [(0, -1), (0, 3, 0, -1), (-1,), (0, 0, 20)])
def test_reshape_copies_zero_and_infers_minus_one(shape):
    feeds = {"x": normal(2, 3, 4, 5)}
    check(op_model("Reshape", feeds, {"shape": ints(*shape)}), feeds)


def test_transpose_concat_and_split():
    feeds = {"x": normal(2, 3, 4)}
    check(op_model("Transpose", feeds, perm=[2, 0, 1]), feeds)
    check(op_model("Transpose", feeds), feeds)
    check(op_model("Concat", feeds, {"c": normal(2, 2, 4)}, axis=1), feeds)
    check(op_model("Split", feeds, {"s": ints(1, 3)}, outputs=2, axis=2), feeds)
    check(op_model("Split", feeds, opset=11, outputs=2, axis=2, split=[3, 1]), feeds)
    check(op_model("Split", feeds, outputs=2, axis=2), feeds)


SLICES = [
    dict(starts=[1], ends=[3], axes=[1]),
    dict(starts=[0, -3], ends=[2**63 - 1, -1], axes=[2, 1]),
    dict(starts=[-1], ends=[-(2**63)], axes=[2], steps=[-2]),
    dict(starts=[3, 0], ends=[0, 4], axes=[-1, 0], steps=[-1, 2]),
    dict(starts=[5], ends=[9], axes=[2]),  # empty
]


@pytest.mark.parametrize("spec", SLICES, ids=str)
def test_slice_inputs(spec):
    feeds = {"x": normal(3, 4, 5)}
    names = ["starts", "ends", "axes", "steps"]
    constants = {name: ints(*spec[name]) for name in names if name in spec}
    check(op_model("Slice", feeds, constants, inputs=["x", *constants]), feeds)


def test_slice_attributes_before_opset_10():
    feeds = {"x": normal(3, 4, 5)}
    model = op_model("Slice", feeds, opset=9, starts=[0, 2], ends=[2**63 - 1, 2], axes=[2, 0])
    check(model, feeds)
    check(op_model("Slice", feeds, opset=9, starts=[1, 1], ends=[3, -1]), feeds)


GATHER_INDICES = [ints(0, -1, 2), ints(-2), np.array(1), ints(0, 1, 1, 0).reshape(2, 2)]


@pytest.mark.parametrize("indices", GATHER_INDICES, ids=str)
def test_gather(indices):
    feeds = {"x": normal(3, 4, 5)}
    check(op_model("Gather", feeds, {"i": indices}, axis=1), feeds)


def test_unsqueeze_and_squeeze_in_both_forms():
    feeds = {"x": normal(3, 1, 4)}
    check(op_model("Unsqueeze", feeds, opset=11, axes=[0, -1]), feeds)
    check(op_model("Unsqueeze", feeds, {"a": ints(0, 4)}), feeds)
    check(op_model("Squeeze", feeds, opset=11, axes=[1]), feeds)
    check(op_model("Squeeze", feeds, {"a": ints(-2)}), feeds)
    check(op_model("Squeeze", feeds), feeds)


def test_shape_and_cast():
    feeds = {"x": normal(2, 3, 4)}
    check(op_model("Shape", feeds, out_type=TensorProto.INT64), feeds)
    check(op_model("Shape", feeds, opset=15, start=1, end=-1, out_type=TensorProto.INT64), feeds)
    check(op_model("Cast", feeds, to=TensorProto.INT64, out_type=TensorProto.INT64), feeds)
    check(op_model("Cast", {"i": ints(1, -2)}, to=TensorProto.FLOAT), {"i": ints(1, -2)})


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reductions_in_both_forms(op, keepdims):
    feeds = {"x": normal(2, 3, 4)}
    check(
        op_model(op, feeds, opset=13 if op != "ReduceSum" else 11, axes=[1, -1], keepdims=keepdims),
        feeds,
    )
    check(op_model(op, feeds, {"a": ints(0, 2)}, opset=18, keepdims=keepdims), feeds)
    check(op_model(op, feeds, opset=18, keepdims=keepdims), feeds)  # all axes


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(mode):
    feeds = {"x": normal(1, 2, 5, 6)}
    pads = ints(0, 0, 2, 1, 0, 0, 1, 3)
    value = {"v": np.array(0.5, np.float32)} if mode == "constant" else {}
    check(op_model("Pad", feeds, {"p": pads, **value}, mode=mode), feeds)
    check(op_model("Pad", feeds, opset=2, mode=mode, pads=list(pads)), feeds)


def test_expand_where_and_constant_of_shape():
    feeds = {"x": normal(3, 1)}
    check(op_model("Expand", feeds, {"s": ints(2, 1, 4)}), feeds)
    cond = {"c": np.array([True, False, True])}
    model = op_model("Where", feeds, {**cond, "y": normal(3)}, inputs=["c", "x", "y"])
    check(model, feeds)
    value = numpy_helper.from_array(np.array([1.5], np.float32))
    model = op_model("ConstantOfShape", {"s": ints(2, 3)}, value=value)
    check(model, {"s": ints(2, 3)})


# ---------------------------------------------------------------- what it refuses


def lstm_and_if_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z"])],
        "branch",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("LSTM", ["x", "w", "r"], ["h"], hidden_size=2),
        helper.make_node("ReduceMax", ["x"], ["flag_f"], keepdims=0),
        helper.make_node("Cast", ["flag_f"], ["flag"], to=TensorProto.BOOL),
        helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch),
        helper.make_node("Foo", ["x"], ["unused"], domain="com.example"),
    ]
    inits = [
        numpy_helper.from_array(normal(1, 8, 4), "w"),
        numpy_helper.from_array(normal(1, 8, 2), "r"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_ops_are_all_named_at_construction():
    model = lstm_and_if_model()
    assert supported(model) == ["If", "LSTM", "com.example.Foo"]
    with pytest.raises(UnsupportedOps) as caught:
        TorchGraph(model)
    assert caught.value.op_types == ["If", "LSTM", "com.example.Foo"]
    message = str(caught.value)
    assert "If (control flow" in message and "LSTM (recurrent" in message
    assert "com.example.Foo" in message


def test_the_supported_list_is_what_the_handlers_run():
    from onnxcompress.train.torch_graph import HANDLERS

    assert set(HANDLERS) | {"Constant"} == set(SUPPORTED_OPS)


def test_unsupported_forms_of_supported_ops_are_named():
    feeds = {"x": normal(1, 2, 6, 6)}
    indices = op_model("MaxPool", feeds, outputs=2, kernel_shape=[2, 2])
    assert supported(indices) == ["MaxPool (with Indices output)"]
    with pytest.raises(UnsupportedOps, match="MaxPool \\(with Indices output\\)"):
        TorchGraph(indices)
    dilated = op_model("AveragePool", feeds, opset=19, kernel_shape=[2, 2], dilations=[2, 2])
    assert supported(dilated) == ["AveragePool (with dilations)"]
    assert supported(op_model("MaxPool", feeds, kernel_shape=[2, 2])) == []
