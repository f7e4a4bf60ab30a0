"""The `upcast` pass: a float16 model computed in float32, checked in onnxruntime against the
float32 model with the same (float16-rounded) weights, with the model's input and output
types kept or changed as asked; and `auto` searching a float16 model on its upcast."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import auto, get_pass, upcast

from models.fixtures import half_precision, mlp, vgg_style
from onnxcompress import graph
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.report import rows as report_rows
from onnxcompress.runtime import run_model
from tests.conftest import shared_model

VGG_SHAPES = {"input": [2, 3, 32, 32]}


def _run(model, shapes=VGG_SHAPES, **options):
    spec = get_pass("upcast")
    return spec.run(model, spec.make_options(options), PassContext(shapes, seed=0, threads=1))


def _rounded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 model with its weights rounded to float16's values: what the upcast of its
    float16 copy must compute."""
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for init in rounded.graph.initializer:
        value = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    return rounded


def _images(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(VGG_SHAPES["input"]).astype(dtype)}]


def _elem_type(values) -> list[int]:
    return [v.type.tensor_type.elem_type for v in values]


@pytest.mark.parametrize("build", [vgg_style, mlp])
def test_float32_io_computes_exactly_the_float16_weights_in_float32(build):
    model = build()
    shapes = VGG_SHAPES if build is vgg_style else {"input": [32, 64]}
    result = _run(half_precision(model), shapes, io="float32")
    graph.check_model(result.model)
    assert not any(t.data_type == TensorProto.FLOAT16 for t in result.model.graph.initializer)
    (name, shape), rng = next(iter(shapes.items())), np.random.default_rng(1)
    feeds = [{name: rng.standard_normal(shape).astype(np.float32)}]
    want, got = run_model(_rounded(model), feeds), run_model(result.model, feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert result.summary["upcast"]["graph inputs/outputs"] == 2


def test_kept_io_stays_float16_and_is_closer_to_float32_than_the_float16_model():
    model, half = vgg_style(), half_precision(vgg_style())
    result = _run(half)
    graph.check_model(result.model)
    g = result.model.graph
    assert _elem_type(g.input) == _elem_type(g.output) == [TensorProto.FLOAT16]
    assert [n.op_type for n in (g.node[0], g.node[-1])] == ["Cast", "Cast"]
    assert result.summary["upcast"]["boundary casts"] == 2
    assert result.summary["notes"] == (
        "float16 → float32: 12 weights, 0 Constants, 0 Cast/dtype attributes; inputs and "
        "outputs kept float16 (2 Casts)"
    )
    feeds16 = _images(np.float16)
    exact = run_model(_rounded(model), [{"input": feeds16[0]["input"].astype(np.float32)}])
    got, before = run_model(result.model, feeds16), run_model(half, feeds16)
    (key,) = exact
    assert got[key].dtype == np.float16
    # Only the output's final rounding to float16 separates it from float32 maths.
    np.testing.assert_allclose(got[key], exact[key], rtol=2e-3, atol=2e-3)
    upcast_error = np.abs(got[key] - exact[key]).max()
    assert upcast_error <= np.abs(before[key].astype(np.float32) - exact[key]).max()


def _cast_sandwich() -> onnx.ModelProto:
    """float16 in → Cast to float → MatMul → Cast to float16 → Add a float16 Constant → out,
    with the output also read inside the graph: what mixed-precision exports hold."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "b")
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="up"),
        helper.make_node("MatMul", ["x32", "w"], ["y32"], name="mm"),
        helper.make_node("Cast", ["y32"], ["y16"], to=TensorProto.FLOAT16, name="down"),
        helper.make_node("Constant", [], ["b16"], value=bias, name="bias"),
        helper.make_node("Add", ["y16", "b16"], ["out"], name="add"),
        helper.make_node("Relu", ["out"], ["relu"], name="relu"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])]
    outputs = [
        helper.make_tensor_value_info("out", TensorProto.FLOAT16, [2, 4]),
        helper.make_tensor_value_info("relu", TensorProto.FLOAT16, [2, 4]),
    ]
    g = helper.make_graph(nodes, "sandwich", inputs, outputs, initializer=[w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_casts_constants_and_an_output_read_inside_the_graph():
    model = _cast_sandwich()
    result = _run(model, {"x": [2, 8]})
    graph.check_model(result.model)
    counts = result.summary["upcast"]
    assert (counts["constants"], counts["type attributes"], counts["boundary casts"]) == (1, 1, 3)
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float16)
    got = run_model(result.model, [{"x": x}])
    w = numpy_helper.to_array(model.graph.initializer[0])
    bias = numpy_helper.to_array(model.graph.node[3].attribute[0].t).astype(np.float32)
    exact = x.astype(np.float32) @ w + bias  # no float16 rounding between MatMul and Add
    np.testing.assert_allclose(got["out"].astype(np.float32), exact, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(got["relu"], np.maximum(got["out"], 0))
    assert got["out"].dtype == got["relu"].dtype == np.float16


def test_weights_listed_as_graph_inputs_are_retyped_with_them():
    half = half_precision(vgg_style())
    half.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in half.graph.initializer
    )
    half.ir_version = 3
    result = _run(half)
    graph.check_model(result.model)
    weights = {t.name for t in result.model.graph.initializer}
    listed = [i for i in result.model.graph.input if i.name in weights]
    assert listed and set(_elem_type(listed)) == {TensorProto.FLOAT}


def test_a_model_without_float16_is_refused():
    with pytest.raises(CompressError, match="computes nothing in float16"):
        _run(vgg_style())


def test_float16_inside_a_subgraph_is_refused():
    half = half_precision(vgg_style())
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
            np.ones(1, np.float16), "c"))],
        "branch", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT16, [1])],
    )  # fmt: skip
    cond = numpy_helper.from_array(np.array(True), "cond")
    half.graph.initializer.append(cond)
    half.graph.node.append(
        helper.make_node("If", ["cond"], ["branch_out"], then_branch=branch, else_branch=branch)
    )
    with pytest.raises(CompressError, match="If/Loop/Scan"):
        _run(half)


def test_bad_io_option_is_one_clear_error():
    with pytest.raises(CompressError, match="io must be keep or float32"):
        _run(half_precision(vgg_style()), io="half")


def test_auto_searches_a_float16_model_on_its_upcast_with_the_target_scaled(monkeypatch):
    monkeypatch.setattr("onnxcompress.auto.checks.latency_ratio", lambda *args: 0.8)
    half = half_precision(vgg_style())
    calibration = _images(np.float16) * 2
    spec = get_pass("auto")
    options = spec.make_options({"target_latency": 0.6, "methods": "svd", "int8": False})
    context = PassContext(VGG_SHAPES, calibration, seed=0, threads=1)
    model, scaled, done = _upcast_first(half, options, context)
    assert scaled.budget() == ("latency", 0.75)  # 0.6 of the float16 model's 0.8
    note = (
        "searched on the float32 upcast of this float16 model: target 0.6 of the model given "
        "is 0.75 of the upcast, whose latency is 0.8 of the model's"
    )
    assert done == {
        "from": "float16", "to": "float32", "latency_ratio": 0.8, "target_given": 0.6,
        "target": 0.75, "note": note,
    }  # fmt: skip
    assert not upcast.computes_in_float16(model)
    text = report_rows.budget_text({"budget": {"kind": "latency", "target": 0.75}, "upcast": done})
    assert text == f"latency budget, target 0.75 ({note})"


def _upcast_first(model, options, context):
    return auto._upcast_first(model, options, context)


@pytest.mark.parametrize(
    ("options", "wanted"),
    [
        ({"target_latency": 0.5}, True),
        ({"target_macs": 0.5}, False),
        ({"target_bytes": 0.5, "upcast": True}, True),
        ({"target_latency": 0.5, "upcast": False}, False),
    ],
)
def test_auto_upcasts_float16_models_for_latency_targets_by_default(options, wanted):
    spec = get_pass("auto")
    made = spec.make_options(options)
    assert made.wants_upcast(half_precision(vgg_style())) is wanted
    assert made.wants_upcast(vgg_style()) is False


def test_a_bytes_target_is_scaled_by_the_doubled_weights():
    spec = get_pass("auto")
    options = spec.make_options({"target_bytes": 0.5, "upcast": True})
    context = PassContext(VGG_SHAPES, seed=0, threads=1)
    _, scaled, done = _upcast_first(half_precision(vgg_style()), options, context)
    assert done["bytes_ratio"] == pytest.approx(2.0)
    assert scaled.budget() == ("bytes", 0.25)


def test_cli_on_the_shared_float16_squeezenet(tmp_path):
    source = shared_model("squeezenet1.0_fp16.onnx")
    digest = hashlib.md5(source.read_bytes()).hexdigest()
    out = tmp_path / "sq32.onnx"
    run = subprocess.run(
        [sys.executable, "-m", "onnxcompress", str(source), "--passes", "upcast", "-o", str(out),
         "--threads", "1", "--quiet"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    written = onnx.load(out)
    graph.check_model(written)
    assert _elem_type(written.graph.input) == [TensorProto.FLOAT16]
    assert not upcast.computes_in_float16(written)
    assert hashlib.md5(source.read_bytes()).hexdigest() == digest


def _output_cast_model() -> onnx.ModelProto:
    """float32 in; a float16 Constant added in float16; a Cast to float16 makes the output."""
    half = numpy_helper.from_array(np.full(4, 0.5, np.float16), "h")
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="down"),
        helper.make_node("Constant", [], ["h16"], value=half, name="half"),
        helper.make_node("Add", ["x16", "h16"], ["sum16"], name="add"),
        helper.make_node("Relu", ["sum16"], ["relu16"], name="relu"),
        helper.make_node("Cast", ["relu16"], ["y"], to=TensorProto.FLOAT16, name="out"),
    ]
    g = helper.make_graph(
        nodes, "output_cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("io", "casts", "out_type"), [("keep", 0, np.float16), ("float32", 1, np.float32)]
)
def test_a_cast_that_makes_an_output_is_the_boundary_when_io_is_kept(io, casts, out_type):
    model = _output_cast_model()
    result = _run(model, {"x": [2, 4]}, io=io)
    graph.check_model(result.model)
    nodes = result.model.graph.node
    assert len(nodes) == len(model.graph.node)  # no Cast added either way
    assert result.summary["upcast"]["type attributes"] == 1 + casts
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    got = run_model(result.model, [{"x": x}])["y"]
    assert got.dtype == out_type
    np.testing.assert_allclose(got.astype(np.float32), np.maximum(x + 0.5, 0), atol=1e-3)


def test_an_upcast_model_is_not_upcast_again():
    once = _run(half_precision(vgg_style())).model
    with pytest.raises(CompressError, match="computes nothing in float16"):
        _run(once)
