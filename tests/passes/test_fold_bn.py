"""fold_bn: the folding maths alone, then tiny models per layer kind, then real models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass
from onnxcompress.passes.fold_bn import FoldBnOptions, fold_batchnorm, fold_bn, fold_scale_shift

from onnxcompress import graph
from onnxcompress.passkit import PassContext
from tests.conftest import SHARED

ort.set_default_logger_severity(3)

SHARED_MODELS = SHARED / "models"
EPS = 1e-3


# ---------------------------------------------------------------- maths, on arrays only


def test_fold_scale_shift_conv_axis0_matches_loop():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3, 2, 2)), rng.standard_normal(4)
    scale, shift = rng.standard_normal(4), rng.standard_normal(4)
    new_w, new_b = fold_scale_shift(w, b, scale, shift, axis=0)
    for o in range(4):
        np.testing.assert_allclose(new_w[o], w[o] * scale[o])
    np.testing.assert_allclose(new_b, b * scale + shift)


def test_fold_scale_shift_grouped_transpose_scales_channels_per_group():
    rng = np.random.default_rng(1)
    groups, c_in, per_group = 2, 6, 4  # ConvTranspose weight [C_in, C_out/groups, k, k]
    w = rng.standard_normal((c_in, per_group, 3, 3))
    scale = rng.standard_normal(groups * per_group)
    new_w, new_b = fold_scale_shift(w, None, scale, np.zeros(8), axis=1, groups=groups)
    for ci in range(c_in):
        group = ci // (c_in // groups)
        for j in range(per_group):
            np.testing.assert_allclose(new_w[ci, j], w[ci, j] * scale[group * per_group + j])
    np.testing.assert_array_equal(new_b, np.zeros(8))  # no bias: shift alone


def test_fold_scale_shift_keeps_fp16_and_rejects_wrong_length():
    w = np.ones((3, 2), dtype=np.float16)
    new_w, new_b = fold_scale_shift(w, None, np.full(2, 0.5), np.ones(2), axis=1)
    assert new_w.dtype == np.float16 and new_b.dtype == np.float16
    np.testing.assert_array_equal(new_w, np.full((3, 2), 0.5, dtype=np.float16))
    with pytest.raises(ValueError, match="output channels"):
        fold_scale_shift(w, None, np.ones(3), np.ones(3), axis=1)


# ---------------------------------------------------------------- tiny models


def _tensor(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _bn_params(rng, channels, prefix="bn", dtype=np.float32):
    gamma = rng.uniform(0.5, 2.0, channels).astype(dtype)
    beta, mean = _tensor(rng, channels, dtype), _tensor(rng, channels, dtype)
    var = rng.uniform(0.2, 2.0, channels).astype(dtype)
    names = [f"{prefix}_{n}" for n in ("scale", "bias", "mean", "var")]
    return names, [gamma, beta, mean, var]


def _model(nodes, x_shape, y_name, weights, *, dtype=np.float32, opset=17, ir=8, as_inputs=False):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info("x", elem, x_shape)]
    inits = [numpy_helper.from_array(v, n) for n, v in weights.items()]
    if as_inputs:  # IR 3: every initializer is listed as a graph input too
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(y_name, elem, None)])
    g.initializer.extend(inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    # the full checker wants typed outputs: let shape inference fill in the output's shape
    return onnx.shape_inference.infer_shapes(model)


def conv_bn(
    *,
    bias=True,
    group=1,
    c_in=4,
    c_out=6,
    dtype=np.float32,
    opset=17,
    ir=8,
    as_inputs=False,
    kernel=(3, 3),
    **conv_attrs,
):
    rng = np.random.default_rng(10 + group)
    weights = {"W": _tensor(rng, (c_out, c_in // group, *kernel), dtype)}
    conv_in = ["x", "W"]
    if bias:
        weights["B"] = _tensor(rng, c_out, dtype)
        conv_in.append("B")
    names, params = _bn_params(rng, c_out, dtype=dtype)
    weights.update(zip(names, params, strict=True))
    nodes = [
        helper.make_node("Conv", conv_in, ["c"], name="conv", group=group, **conv_attrs),
        helper.make_node("BatchNormalization", ["c", *names], ["y"], name="bn", epsilon=EPS),
    ]
    return _model(
        nodes, [2, c_in, 9, 10], "y", weights, dtype=dtype, opset=opset, ir=ir, as_inputs=as_inputs
    )


def conv_transpose_bn(group):
    rng = np.random.default_rng(20 + group)
    c_in, c_out = 4, 6
    weights = {"W": _tensor(rng, (c_in, c_out // group, 3, 3)), "B": _tensor(rng, c_out)}
    names, params = _bn_params(rng, c_out)
    weights.update(zip(names, params, strict=True))
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["x", "W", "B"],
            ["c"],
            name="conv",
            group=group,
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            output_padding=[1, 1],
        ),
        helper.make_node("BatchNormalization", ["c", *names], ["r"], name="bn", epsilon=EPS),
        helper.make_node("Relu", ["r"], ["y"], name="relu"),
    ]
    return _model(nodes, [2, c_in, 5, 6], "y", weights)


def gemm_bn(trans_b, with_c=True):
    rng = np.random.default_rng(30 + trans_b)
    k, n = 5, 7
    weights = {"W": _tensor(rng, (n, k) if trans_b else (k, n))}
    if with_c:
        weights["C"] = _tensor(rng, (1, n))
    names, params = _bn_params(rng, n)
    weights.update(zip(names, params, strict=True))
    gemm_in = ["x", "W", "C"] if with_c else ["x", "W"]
    nodes = [
        helper.make_node("Gemm", gemm_in, ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3),
        helper.make_node("BatchNormalization", ["g", *names], ["y"], name="bn", epsilon=EPS),
    ]
    return _model(nodes, [3, k], "y", weights)


def conv_mul_add(mul_shape=(6, 1, 1), add_shape=(1, 6, 1, 1)):
    rng = np.random.default_rng(40)
    weights = {
        "W": _tensor(rng, (6, 4, 3, 3)),
        "B": _tensor(rng, 6),
        "m": _tensor(rng, mul_shape),
        "a": _tensor(rng, add_shape),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
        helper.make_node("Mul", ["m", "c"], ["p"], name="mul"),  # constant first: commutes
        helper.make_node("Add", ["p", "a"], ["y"], name="add"),
    ]
    return _model(nodes, [2, 4, 8, 8], "y", weights)


def conv_bn_constant_nodes():
    """paddle2onnx style: every weight is the output of a `Constant` node."""
    model = conv_bn()
    consts = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
        for t in model.graph.initializer
    ]
    del model.graph.initializer[:]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(consts + nodes)
    return model


def _run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return session.run(None, {name: x})


def _input(model, shape=None):
    vi = model.graph.input[0]
    shape = shape or [d.dim_value for d in vi.type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def _count(model, *ops):
    return sum(node.op_type in ops for node in model.graph.node)


def _fold_and_check(model, x=None, rtol=1e-4, atol=1e-5, options=None):
    """Fold, then: structure, checker, numbers against the original, second run idle."""
    original = model.SerializeToString()
    result = fold_bn(model, options or FoldBnOptions(), PassContext(input_shapes={}))
    assert model.SerializeToString() == original, "the caller's model was modified"
    assert result.changed
    onnx.checker.check_model(result.model, full_check=True)
    graph.check_model(result.model)  # the core's check: also strict shape inference
    x = _input(model) if x is None else x
    for before, after in zip(_run(model, x), _run(result.model, x), strict=True):
        np.testing.assert_allclose(after, before, rtol=rtol, atol=atol)
    again = fold_bn(result.model, options or FoldBnOptions(), PassContext(input_shapes={}))
    assert not again.changed
    assert all(r.status == "skipped" for r in again.records)
    return result


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(conv_bn(strides=[2, 2], pads=[1, 1, 1, 1]), id="conv-bias"),
        pytest.param(
            conv_bn(bias=False, kernel=(1, 3), dilations=[2, 1], pads=[2, 1, 2, 1]),
            id="conv-no-bias",
        ),
        pytest.param(conv_bn(group=2), id="conv-group2"),
        pytest.param(conv_bn(group=4, c_in=4, c_out=8), id="depthwise"),
        pytest.param(conv_transpose_bn(group=1), id="convtranspose"),
        pytest.param(conv_transpose_bn(group=2), id="convtranspose-group2"),
        pytest.param(gemm_bn(trans_b=1), id="gemm-transB1"),
        pytest.param(gemm_bn(trans_b=0), id="gemm-transB0"),
        pytest.param(gemm_bn(trans_b=1, with_c=False), id="gemm-no-C"),
        pytest.param(conv_bn_constant_nodes(), id="constant-nodes"),
        pytest.param(conv_bn(opset=7, ir=3, as_inputs=True), id="ir3-weights-as-inputs"),
    ],
)
def test_batchnorm_folds_and_outputs_match(model):
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    target = next(n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm"))
    channels = len(numpy_helper.to_array(_param(model, bn.input[1])))
    result = _fold_and_check(model)
    assert _count(result.model, "BatchNormalization") == 0
    [record] = [r for r in result.records if r.op == "BatchNormalization"]
    assert (record.status, record.node, record.details["into"]) == ("rewritten", "bn", target.name)
    had_bias = len(target.input) > 2
    # the 4 BN vectors go; a bias of C values appears when the layer had none
    assert record.params_before - record.params_after == (4 if had_bias else 3) * channels
    # graph outputs keep their names, and no graph input is left over for old weights
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in result.model.graph.input] == ["x"]


def _param(model, name):
    for t in model.graph.initializer:
        if t.name == name:
            return t
    node = next(n for n in model.graph.node if n.output[0] == name)
    return node.attribute[0].t


def test_mul_and_add_by_per_channel_constants_fold():
    result = _fold_and_check(conv_mul_add())
    assert _count(result.model, "Mul", "Add") == 0 and _count(result.model, "Conv") == 1
    assert [(r.node, r.status, r.details["into"]) for r in result.records] == [
        ("mul", "rewritten", "conv"),
        ("add", "rewritten", "conv"),
    ]


def test_scalar_mul_folds_and_spatial_constant_is_skipped():
    result = _fold_and_check(conv_mul_add(mul_shape=(), add_shape=(1, 1, 1, 6)))
    by_node = {r.node: r for r in result.records}
    assert by_node["mul"].status == "rewritten"
    assert by_node["add"].status == "skipped"
    assert "not a scalar or per-channel" in by_node["add"].reason


def _as_float32(model):
    """The same fp16 model with its weights and types widened to fp32 (exactly)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    for t in wide.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for vi in [*wide.graph.input, *wide.graph.output, *wide.graph.value_info]:
        vi.type.tensor_type.elem_type = TensorProto.FLOAT
    return wide


def test_fp16_weights_fold():
    model = conv_bn(dtype=np.float16, c_in=8, c_out=8)
    x = _input(model)
    reference = _run(_as_float32(model), x.astype(np.float32))[0]
    # fp16 keeps 11 significant bits. The original rounds the conv output to fp16 before the BN,
    # the folded model rounds W*scale to fp16 instead, so the two differ by rounding, not by
    # maths: measured 1 fp16 ulp of the largest output (|y| ~ 30, ulp 0.016-0.031) over 3 seeds.
    # Allow 4 ulps of the output's magnitude; rtol 1e-4 would ask for more bits than fp16 has.
    ulp = float(np.spacing(np.float16(np.abs(reference).max())))
    result = _fold_and_check(model, x, rtol=0, atol=4 * ulp)
    # and the folded fp16 model is as close to fp32 maths on the same weights as the original
    folded = _run(result.model, x)[0].astype(np.float32)
    np.testing.assert_allclose(folded, reference, rtol=0, atol=4 * ulp)
    weight = next(t for t in result.model.graph.initializer if t.dims == [8, 8, 3, 3])
    assert weight.data_type == TensorProto.FLOAT16
    assert _count(result.model, "BatchNormalization") == 0


def _skip_reason(model, **options):
    result = fold_bn(model, FoldBnOptions(**options), PassContext(input_shapes={}))
    assert not result.changed
    assert result.model.SerializeToString() == model.SerializeToString()
    [record] = [r for r in result.records if r.op == "BatchNormalization"]
    assert record.status == "skipped"
    return record.reason


def test_batchnorm_on_graph_input_is_skipped():
    rng = np.random.default_rng(5)
    names, params = _bn_params(rng, 4)
    bn = helper.make_node("BatchNormalization", ["x", *names], ["y"], name="bn")
    model = _model([bn], [1, 4, 3, 3], "y", dict(zip(names, params, strict=True)))
    assert (
        _skip_reason(model) == "input is a graph input, not the output of Conv/ConvTranspose/Gemm"
    )


def test_batchnorm_after_relu_is_skipped():
    model = conv_bn()
    model.graph.node.insert(1, helper.make_node("Relu", ["c"], ["c_relu"], name="relu"))
    model.graph.node[2].input[0] = "c_relu"
    assert _skip_reason(model) == "input is produced by Relu, not Conv/ConvTranspose/Gemm"


def test_conv_output_used_twice_is_skipped():
    model = conv_bn()
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    assert _skip_reason(model) == "Conv output has 2 consumers"


def test_conv_output_that_is_a_graph_output_is_skipped():
    model = conv_bn()
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    assert _skip_reason(model) == "Conv output is also a graph output"


def test_shared_weight_is_skipped():
    model = conv_bn(bias=False)
    model.graph.node.append(helper.make_node("Conv", ["x", "W"], ["c2"], name="twin"))
    model.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    assert _skip_reason(model) == "weight shared with twin"


def test_convtranspose_can_be_switched_off():
    reason = _skip_reason(conv_transpose_bn(group=1), conv_transpose=False)
    assert reason == "folding into ConvTranspose is off (conv_transpose=False)"


def test_old_batchnorm_with_statistics_outputs_is_training_mode():
    # Opset 7: naming the 4 statistics outputs selects training mode (batch statistics);
    # onnxruntime computes it that way, so folding running statistics would change outputs.
    model = conv_bn(opset=7, ir=3, as_inputs=True)
    bn = model.graph.node[1]
    bn.output.extend(["m_out", "v_out", "m_saved", "v_saved"])
    assert _skip_reason(model) == "training-mode BatchNormalization"


def test_training_mode_attribute_is_skipped():
    model = conv_bn(opset=15)
    bn = model.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["m_out", "v_out"])
    assert _skip_reason(model) == "training-mode BatchNormalization"


def test_pure_function_leaves_the_input_alone():
    model = conv_mul_add()
    original = model.SerializeToString()
    folded, records = fold_batchnorm(model, mul_add=False)
    assert model.SerializeToString() == original
    assert records == [] and _count(folded, "Mul", "Add") == 2
    folded, records = fold_batchnorm(model)
    assert model.SerializeToString() == original
    assert [r.status for r in records] == ["rewritten", "rewritten"]
    assert _count(folded, "Mul", "Add") == 0


def test_registered_with_options_from_strings():
    spec = get_pass("fold_bn")
    options = spec.make_options({"mul_add": "false"})
    result = spec.run(conv_mul_add(), options, PassContext(input_shapes={}))
    assert not result.changed and result.records == []


# ---------------------------------------------------------------- real models


def _real(name):
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return onnx.load(str(path))


@pytest.mark.parametrize(
    "name, shape, folded",
    [
        ("ultraface_rfb_320.onnx", [1, 3, 240, 320], 35),  # weights also listed as graph inputs
        ("ppocr_mobile_v2.0_cls.onnx", [1, 3, 48, 192], 35),  # weights in Constant nodes
    ],
)
def test_real_models_fold_every_batchnorm(name, shape, folded):
    model = _real(name)
    result = _fold_and_check(model, _input(model, shape))
    assert _count(model, "BatchNormalization") == folded
    assert _count(result.model, "BatchNormalization") == 0
    rewritten = [r for r in result.records if r.status == "rewritten"]
    assert len(rewritten) == folded
    assert all(r.op == "BatchNormalization" for r in rewritten)


def test_resnet20_has_no_batchnorm_left_to_fold():
    # The torch exporter already folded its BNs into the convs (0 BatchNormalization nodes);
    # its residual Adds get records and nothing changes.
    model = _real("resnet20_cifar10.onnx")
    assert _count(model, "BatchNormalization") == 0
    result = fold_bn(model, FoldBnOptions(), PassContext(input_shapes={}))
    assert not result.changed
    assert {r.reason for r in result.records} == {"other operand of Add is not a constant"}


def test_mnist_conv_bias_adds_fold():
    # CNTK export: Conv without bias, then Add of a [C,1,1] constant
    model = _real("mnist_cntk.onnx")
    result = _fold_and_check(model, _input(model) * 255)
    assert _count(result.model, "Add") == 1  # the MatMul's bias stays
