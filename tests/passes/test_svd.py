"""svd pass: exact recovery at the true rank for every Gemm/MatMul/Conv variant, the MAC and
error bookkeeping, skips with reasons, and the fixture models with and without refit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass

from models.fixtures import mlp, transformer_block, vgg_style
from onnxcompress import graph
from onnxcompress.analyse import analyse
from onnxcompress.layers import named_copy
from onnxcompress.linear_layers import linear_layers
from onnxcompress.maths import factors as factorize
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model

RTOL, ATOL = 1e-4, 1e-5
OUT4 = ["n", "c", "h", "w"]  # conv outputs: rank known, dims left to shape inference
SVD = get_pass("svd")


# ---------------------------------------------------------------- helpers


def _model(nodes, inputs, outputs, inits=(), ir_version=8) -> onnx.ModelProto:
    body = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def _float(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _low_rank(rng, m, n, rank) -> np.ndarray:
    return (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) / rank).astype(
        np.float32
    )


def _run_svd(model, shapes, calibration=None, **options):
    raw = {"never_slower": False, "refit": False, **options}
    return SVD.run(model, SVD.make_options(raw), PassContext(shapes, calibration=calibration))


def _outputs(model, feeds) -> list[np.ndarray]:
    result = run_model(model, [feeds])  # graph optimisations off
    return [result[out.name] for out in model.graph.output]


def _assert_sound(original, result, shapes) -> None:
    """The written model passes the checker, and its MACs are the records' MACs."""
    graph.check_model(result.model)
    graph.check_model(graph.cleanup_and_sort(result.model))
    saved = sum(r.macs_before - r.macs_after for r in result.records if r.status == "rewritten")
    before = analyse(original, shapes).total_macs
    assert analyse(result.model, shapes).total_macs == before - saved
    assert result.summary["macs_after"] == before - saved


def _assert_exact(original, shapes, feeds, rank, ops=None, **options):
    result = _run_svd(original, shapes, rank=rank, **options)
    assert result.changed
    rewritten = [r for r in result.records if r.status == "rewritten"]
    assert len(rewritten) == 1, [r.to_dict() for r in result.records]
    assert rewritten[0].details["rank"] == rank
    assert rewritten[0].details["weight_rel_error"] < 1e-5
    if ops is not None:
        assert [n.op_type for n in result.model.graph.node] == ops
    for want, got in zip(_outputs(original, feeds), _outputs(result.model, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    _assert_sound(original, result, shapes)
    return result


# ---------------------------------------------------------------- Gemm


def _gemm_model(rng, trans_a, trans_b, alpha, beta, c_kind, m=6, k=40, n=24, rank=4):
    w = _low_rank(rng, k, n, rank)
    inputs = ["x", "w"]
    inits = [_const("w", w.T if trans_b else w)]
    c_shape = {"none": None, "vec": (n,), "row": (1, n), "full": (m, n), "scalar": ()}[c_kind]
    if c_shape is not None:
        inits.append(_const("c", rng.standard_normal(c_shape)))
        inputs.append("c")
    attrs = {"alpha": alpha, "beta": beta, "transA": trans_a, "transB": trans_b}
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", **attrs)
    x_shape = [k, m] if trans_a else [m, k]
    model = _model([node], [_float("x", x_shape)], [_float("y", [m, n])], inits)
    return model, {"x": x_shape}, {"x": rng.standard_normal(x_shape).astype(np.float32)}


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    "alpha, beta, c_kind",
    [
        (1.0, 1.0, "none"),
        (0.5, 2.0, "vec"),
        (1.5, 0.5, "row"),
        (0.7, 1.3, "full"),
        (2.0, 3.0, "scalar"),
    ],
)
def test_gemm_exact_at_true_rank(trans_a, trans_b, alpha, beta, c_kind):
    rng = np.random.default_rng(trans_a + 2 * trans_b)
    model, shapes, feeds = _gemm_model(rng, trans_a, trans_b, alpha, beta, c_kind)
    result = _assert_exact(model, shapes, feeds, rank=4, ops=["Gemm", "Gemm"])
    first, second = result.model.graph.node
    assert graph.node_attributes(first).get("transA", 0) == trans_a
    assert graph.node_attributes(second).get("transB", 0) == 0
    assert graph.node_attributes(second).get("alpha", 1.0) == 1.0
    record = next(r for r in result.records if r.status == "rewritten")
    if c_kind == "full":
        assert record.details["refit"].startswith("none")  # C varies by row
    else:
        assert "refit" not in record.details  # a refit site exists (no data: not run)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_of_opset_9_keeps_every_gemm_valid(trans_b):
    """Gemm before opset 11 requires C: the first factor gets a zero one (the CIFAR-10
    tutorial CNN in ../shared is opset 9)."""
    rng = np.random.default_rng(5)
    model, shapes, feeds = _gemm_model(rng, 0, trans_b, 1.0, 1.0, "vec")
    model.opset_import[0].version = 9
    result = _assert_exact(model, shapes, feeds, rank=4, ops=["Gemm", "Gemm"])
    assert all(len(node.input) == 3 for node in result.model.graph.node)


def test_linear_layers_reads_gemm_as_x_at_w():
    rng = np.random.default_rng(5)
    model, shapes, _ = _gemm_model(rng, 1, 1, 0.5, 2.0, "row")
    model = named_copy(model)
    (layer,), skipped = linear_layers(model, analyse(model, shapes))
    stored = numpy_helper.to_array(model.graph.initializer[0])
    c = numpy_helper.to_array(model.graph.initializer[1])
    assert not skipped and layer.side == "right" and layer.trans == 1
    np.testing.assert_allclose(layer.weight, 0.5 * stored.T, rtol=1e-6)
    np.testing.assert_allclose(layer.bias, 2.0 * c[0], rtol=1e-6)
    assert (layer.in_features, layer.out_features, layer.positions) == (40, 24, 6)


@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 1)])
def test_gemm_with_constant_a_is_left_side_and_exact(trans_a, trans_b):
    rng = np.random.default_rng(11)
    m, k, n = 30, 36, 5
    w = _low_rank(rng, m, k, 3)
    node = helper.make_node(
        "Gemm", ["w", "x", "c"], ["y"], name="fc", transA=trans_a, transB=trans_b, alpha=0.5
    )
    x_shape = [n, k] if trans_b else [k, n]
    inits = [_const("w", w.T if trans_a else w), _const("c", rng.standard_normal((m, 1)))]
    model = _model([node], [_float("x", x_shape)], [_float("y", [m, n])], inits)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    result = _assert_exact(model, {"x": x_shape}, feeds, rank=3, ops=["Gemm", "Gemm"])
    record = next(r for r in result.records if r.status == "rewritten")
    assert record.details["form"] == "gemm_left" and record.details["refit"].startswith("none")


# ---------------------------------------------------------------- MatMul


def _matmul_model(rng, x_shape, k=48, n=32, rank=5, add_bias=False, source="initializer"):
    w = _low_rank(rng, k, n, rank)
    out_shape = [*x_shape[:-1], n]
    nodes, inits, inputs = [], [], [_float("x", x_shape)]
    if source == "constant":
        nodes.append(helper.make_node("Constant", [], ["w"], value=_const("w_value", w)))
    else:
        inits.append(_const("w", w))
        if source == "graph_input":
            inputs.append(_float("w", [k, n]))
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["h" if add_bias else "y"], name="mm"))
    if add_bias:
        inits.append(_const("bias", rng.standard_normal(n)))
        nodes.append(helper.make_node("Add", ["h", "bias"], ["y"], name="add"))
    model = _model(nodes, inputs, [_float("y", out_shape)], inits)
    return model, {"x": x_shape}, {"x": rng.standard_normal(x_shape).astype(np.float32)}


@pytest.mark.parametrize("x_shape", [[2, 8, 48], [5, 48]])
@pytest.mark.parametrize("add_bias", [False, True])
def test_matmul_right_exact_at_true_rank(x_shape, add_bias):
    rng = np.random.default_rng(len(x_shape))
    model, shapes, feeds = _matmul_model(rng, x_shape, add_bias=add_bias)
    ops = ["MatMul", "MatMul", "Add"] if add_bias else ["MatMul", "MatMul"]  # no extra Add
    result = _assert_exact(model, shapes, feeds, rank=5, ops=ops)
    rewritten = next(r for r in result.records if r.status == "rewritten")
    assert rewritten.details["form"] == "matmul_right"


@pytest.mark.parametrize("source", ["initializer", "constant", "graph_input"])
def test_matmul_weight_sources(source):
    rng = np.random.default_rng(3)
    model, shapes, feeds = _matmul_model(rng, [2, 8, 48], source=source)
    _assert_exact(model, shapes, feeds, rank=5)


def test_bias_less_matmul_gets_a_zero_bias_add_only_when_refit_runs():
    rng = np.random.default_rng(4)
    model, shapes, feeds = _matmul_model(rng, [2, 8, 48])
    calibration = [{"x": rng.standard_normal((2, 8, 48)).astype(np.float32)} for _ in range(2)]
    result = _run_svd(model, shapes, calibration, rank=5, refit=True)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "MatMul", "Add"]
    record = next(r for r in result.records if r.status == "rewritten")
    assert record.details["refit"]["calibration_rel_error_after"] < 1e-3
    assert record.macs_after == 2 * 8 * 5 * (48 + 32) + 2 * 8 * 32  # the Add's MACs included
    (want,), (got,) = _outputs(model, feeds), _outputs(result.model, feeds)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    _assert_sound(model, result, shapes)


def test_matmul_bias_add_is_refit_through_the_existing_add():
    rng = np.random.default_rng(6)
    model, shapes, feeds = _matmul_model(rng, [2, 8, 48], rank=24, add_bias=True)
    calibration = [{"x": rng.standard_normal((2, 8, 48)).astype(np.float32)} for _ in range(16)]
    result = _run_svd(model, shapes, calibration, rank=8, refit=True)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "MatMul", "Add"]
    record = next(r for r in result.records if r.status == "rewritten")
    refit = record.details["refit"]
    assert refit["calibration_rel_error_after"] <= refit["calibration_rel_error_before"]
    bias = numpy_helper.to_array(
        next(i for i in result.model.graph.initializer if i.name == "bias")
    )
    assert bias.shape == (32,)
    _assert_sound(model, result, shapes)


def _subspace_batches(rng, shape, width, count, axis=-1):
    """Batches whose features (on `axis`) span only a `width`-dimensional subspace."""
    k = shape[axis]
    basis = rng.standard_normal((width, k))
    batches = []
    for _ in range(count):
        coefficients = rng.standard_normal((*shape[:axis], *shape[axis:][1:], width))
        x = np.moveaxis(coefficients @ basis, -1, axis) if axis != -1 else coefficients @ basis
        batches.append({"x": x.astype(np.float32)})
    return batches


def test_both_factors_beat_the_last_one_on_inputs_in_a_narrow_subspace():
    rng = np.random.default_rng(21)
    model, shapes, _ = _matmul_model(rng, [2, 8, 48], rank=32, add_bias=True)  # W full rank
    batches = _subspace_batches(rng, [2, 8, 48], width=12, count=21)
    calibration, unseen = batches[:20], batches[20]
    (want,) = _outputs(model, unseen)
    errors = {}
    for refit, both in ((False, False), (True, False), (True, True)):
        result = _run_svd(model, shapes, calibration, rank=6, refit=refit, refit_both=both)
        (got,) = _outputs(result.model, unseen)
        errors[refit, both] = np.linalg.norm(got - want) / np.linalg.norm(want)
        _assert_sound(model, result, shapes)
    refit = next(r for r in result.records if r.status == "rewritten").details["refit"]
    assert refit["fit"].startswith("both factors")
    assert refit["held_out_rows"] == 4 * 2 * 8  # every 5th sample of 20 batches of 2
    assert refit["held_out_rel_error_after"] < refit["held_out_rel_error_before"]
    # rank 6 < the data's 12 dimensions: the data-optimal pair beats refitting one factor.
    assert errors[True, True] < 0.9 * errors[True, False]
    assert errors[True, False] < errors[False, False]


@pytest.mark.parametrize("strides, both", [([1, 1], True), ([2, 2], False)])
def test_pointwise_conv_fits_both_factors_when_it_is_a_product_per_pixel(strides, both):
    rng = np.random.default_rng(22)
    n, c = 24, 32
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", strides=strides)
    x_shape = [2, c, 6, 6]
    model = _model(
        [node],
        [_float("x", x_shape)],
        [_float("y", OUT4)],
        [_const("w", rng.standard_normal((n, c, 1, 1)))],
    )
    batches = _subspace_batches(rng, x_shape, width=3, count=11, axis=1)
    result = _run_svd(model, {"x": x_shape}, batches[:10], rank=4, refit=True)
    refit = next(r for r in result.records if r.status == "rewritten").details["refit"]
    assert ("fit" in refit) == both
    (want,), (got,) = _outputs(model, batches[10]), _outputs(result.model, batches[10])
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    if both:
        assert error < 1e-3
    _assert_sound(model, result, {"x": x_shape})


@pytest.mark.parametrize("x_shape", [[2, 48, 7], [48, 7]])
def test_matmul_left_exact_at_true_rank(x_shape):
    rng = np.random.default_rng(8)
    m, k = 40, 48
    w = _low_rank(rng, m, k, 5)
    node = helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")
    out_shape = [*x_shape[:-2], m, x_shape[-1]]
    model = _model([node], [_float("x", x_shape)], [_float("y", out_shape)], [_const("w", w)])
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    result = _assert_exact(model, {"x": x_shape}, feeds, rank=5, ops=["MatMul", "MatMul"])
    record = next(r for r in result.records if r.status == "rewritten")
    assert record.details["form"] == "matmul_left" and record.details["refit"].startswith("none")
    # never_slower times the layer alone, feeding the activation (input 1 here).
    timed = _run_svd(model, {"x": x_shape}, rank=5, never_slower=True, min_speedup=1e-6)
    assert timed.changed and timed.records[0].details["timing"]["speedup"] > 0


# ---------------------------------------------------------------- Conv


def _conv_model(rng, attrs, kernel=(3, 3), bias=True, c=8, n=16, rank=3, hw=(13, 12)):
    kh, kw = kernel
    vertical = rng.standard_normal((rank, c, kh, 1))
    horizontal = rng.standard_normal((n, rank, 1, kw))
    w = factorize.compose_spatial_svd(vertical, horizontal) / rank
    inits = [_const("w", w)] + ([_const("b", rng.standard_normal(n))] if bias else [])
    node = helper.make_node(
        "Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], name="conv", **attrs
    )
    x_shape = [2, c, *hw]
    model = _model([node], [_float("x", x_shape)], [_float("y", OUT4)], inits)
    return model, {"x": x_shape}, {"x": rng.standard_normal(x_shape).astype(np.float32)}


CONV_CASES = {
    "stride2": ({"strides": [2, 2], "pads": [1, 1, 1, 1]}, (3, 3), True),
    "dilation2": ({"dilations": [2, 2], "pads": [2, 2, 2, 2]}, (3, 3), True),
    "asymmetric_pads": ({"pads": [0, 1, 2, 0]}, (3, 3), True),
    "same_upper": ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (3, 3), True),
    "3x5_no_bias": ({"pads": [1, 2, 1, 2]}, (3, 5), False),
    "mixed": ({"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 2, 3]}, (3, 3), True),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_spatial_svd_exact_at_true_rank(case):
    attrs, kernel, bias = CONV_CASES[case]
    rng = np.random.default_rng(sorted(CONV_CASES).index(case))
    model, shapes, feeds = _conv_model(rng, attrs, kernel, bias)
    result = _assert_exact(model, shapes, feeds, rank=3, ops=["Conv", "Conv"])
    vertical, horizontal = result.model.graph.node
    assert graph.node_attributes(vertical)["kernel_shape"] == [kernel[0], 1]
    assert graph.node_attributes(horizontal)["kernel_shape"] == [1, kernel[1]]
    record = next(r for r in result.records if r.status == "rewritten")
    # The 1×kw conv is a refit site; without calibration data nothing is refit.
    assert record.details["form"] == "spatial" and "refit" not in record.details


@pytest.mark.parametrize("bias, strides", [(True, [2, 2]), (False, [1, 1])])
def test_pointwise_conv_exact_at_true_rank(bias, strides):
    rng = np.random.default_rng(9)
    n, c = 24, 32
    w = _low_rank(rng, n, c, 4).reshape(n, c, 1, 1)
    inits = [_const("w", w)] + ([_const("b", rng.standard_normal(n))] if bias else [])
    node = helper.make_node(
        "Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], name="conv", strides=strides
    )
    x_shape = [2, c, 10, 10]
    model = _model([node], [_float("x", x_shape)], [_float("y", OUT4)], inits)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    result = _assert_exact(model, {"x": x_shape}, feeds, rank=4, ops=["Conv", "Conv"])
    record = next(r for r in result.records if r.status == "rewritten")
    assert record.details["form"] == "pointwise" and "refit" not in record.details


# ---------------------------------------------------------------- error, reruns, skips


def test_error_falls_as_rank_rises():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")
    model = _model([node], [_float("x", [16, 64])], [_float("y", [16, 48])], [_const("w", w)])
    feeds = {"x": rng.standard_normal((16, 64)).astype(np.float32)}
    (want,) = _outputs(model, feeds)
    weight_errors, output_errors = [], []
    for rank in (4, 8, 16, 24):
        result = _run_svd(model, {"x": [16, 64]}, rank=rank)
        (got,) = _outputs(result.model, feeds)
        record = next(r for r in result.records if r.status == "rewritten")
        weight_errors.append(record.details["weight_rel_error"])
        output_errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
        _assert_sound(model, result, {"x": [16, 64]})
    assert weight_errors == sorted(weight_errors, reverse=True)
    assert output_errors == sorted(output_errors, reverse=True)
    assert weight_errors[0] > 0.5 > weight_errors[-1] > 0


def test_energy_option_keeps_that_much_of_the_weight():
    rng = np.random.default_rng(13)
    model, shapes, _ = _gemm_model(rng, 0, 1, 1.0, 1.0, "vec", k=64, n=48, rank=48)
    result = _run_svd(model, shapes, energy=0.8, align=4)
    record = next(r for r in result.records if r.status == "rewritten")
    assert record.details["weight_rel_error"] ** 2 <= 0.2 + 1e-9


def test_second_run_at_the_same_rank_changes_nothing():
    rng = np.random.default_rng(14)
    model, shapes, _ = _matmul_model(rng, [2, 8, 48], add_bias=True)
    once = _run_svd(model, shapes, rank=5)
    twice = _run_svd(once.model, shapes, rank=5)
    assert once.changed and not twice.changed
    assert all(r.status == "skipped" for r in twice.records)


def _two_input_matmul(elem):
    node = helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")
    inputs = [_float("x", [4, 6], elem), _float("z", [6, 5], elem)]
    return _model([node], inputs, [_float("y", [4, 5], elem)])


def test_skips_give_reasons():
    activations = _two_input_matmul(TensorProto.FLOAT)
    result = _run_svd(activations, {"x": [4, 6], "z": [6, 5]})
    assert not result.changed and "no constant operand" in result.records[0].reason

    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    w = numpy_helper.from_array(np.ones((6, 5), np.int32), "w")
    integers = _model(
        [node],
        [_float("x", [4, 6], TensorProto.INT32)],
        [_float("y", [4, 5], TensorProto.INT32)],
        [w],
    )
    result = _run_svd(integers, {"x": [4, 6]})
    assert not result.changed and "not floating point" in result.records[0].reason

    rng = np.random.default_rng(15)
    dw = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=16, pads=[1, 1, 1, 1])
    depthwise = _model(
        [dw],
        [_float("x", [1, 16, 8, 8])],
        [_float("y", OUT4)],
        [_const("w", rng.standard_normal((16, 1, 3, 3)))],
    )
    result = _run_svd(depthwise, {"x": [1, 16, 8, 8]})
    assert not result.changed and "depthwise" in result.records[0].reason

    conv, shapes, _ = _conv_model(rng, {"pads": [1, 1, 1, 1]})
    result = _run_svd(conv, shapes, rank=3, conv=False)
    assert not result.changed and "conv=false" in result.records[0].reason


# ---------------------------------------------------------------- fixture models


def _batches(name, shape, seed, count):
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _rel_error(original, compressed, batches) -> float:
    want, got = run_model(original, batches), run_model(compressed, batches)
    (name,) = want
    return float(np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name]))


@pytest.mark.parametrize(
    "build, name, sample",
    [
        (transformer_block, "tokens", [8, 16, 64]),
        (mlp, "input", [32, 64]),
        (vgg_style, "input", [4, 3, 32, 32]),  # spatial SVD: the 1×kw conv is refit
    ],
    ids=["transformer_block", "mlp", "vgg_style"],
)
def test_fixture_models_compress_and_refit_helps(build, name, sample):
    model = build()
    shapes = {name: sample}
    options = {"target_macs": 0.5, "align": 8, "refit": True}
    plain = _run_svd(model, shapes, **options)
    calibration = _batches(name, sample, seed=1, count=8)
    refit = _run_svd(model, shapes, calibration, **options)
    for result in (plain, refit):
        assert result.changed and result.summary["macs_ratio"] <= 0.5
        _assert_sound(model, result, shapes)
    assert refit.summary["refit"]["layers"] > 0
    check = _batches(name, sample, seed=2, count=4)
    assert _rel_error(model, refit.model, check) < _rel_error(model, plain.model, check)


def test_never_slower_times_matmul_and_gemm_layers():
    model = transformer_block()
    result = _run_svd(model, {"tokens": [8, 16, 64]}, target_macs=0.5, align=8, never_slower=True)
    looked_at = [r for r in result.records if r.status in ("rewritten", "reverted")]
    assert looked_at and all("speedup" in r.details["timing"] for r in looked_at)
    graph.check_model(result.model)
