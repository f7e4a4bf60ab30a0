"""int8: static QDQ quantization — outputs close to the float model's (error reported, bounded
here), the checker passes, weights really stored as int8, opset < 13 converted, CIFAR-10
top-1 kept on ResNet-20, and clean errors for what it cannot do."""

from __future__ import annotations

import io as stdio
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnxcompress.passes import get_pass

from models import fixtures
from onnxcompress import graph, io
from onnxcompress.analyse import analyse
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.report import rows as report_rows
from onnxcompress.runtime import run_model
from onnxcompress.validate import random_inputs
from tests.conftest import SHARED, shared_model

SPEC = get_pass("int8")
SHARED_DATA = SHARED / "data"
CIFAR_MEAN = np.array([125.3, 123.0, 113.9], np.float32)  # as benchmarks/factorization.py
CIFAR_STD = np.array([63.0, 62.1, 66.7], np.float32)


def quantize(model, data, **options):
    shapes = graph.resolve_input_shapes(model, {"input": [4, 3, 32, 32]})
    context = PassContext(input_shapes=shapes, calibration=data)
    return SPEC.run(model, SPEC.make_options(options), context)


def batches(model, count=4, seed=0):
    shapes = graph.resolve_input_shapes(model, {"input": [4, 3, 32, 32]})
    return random_inputs(model, shapes, count=count, seed=seed)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def logits(model, data) -> np.ndarray:
    return np.concatenate([run_model(model, [batch])["logits"] for batch in data])


@pytest.fixture(scope="module")
def resnet_style():
    return fixtures.resnet_style()


def test_every_layer_quantized_outputs_close_and_weights_int8(resnet_style):
    calibration = batches(resnet_style)
    result = quantize(resnet_style, calibration)
    graph.check_model(result.model)
    layers = [n for n in resnet_style.graph.node if n.op_type in ("Conv", "Gemm")]
    assert result.summary["quantized_layers"] == len(layers) == 10
    assert all(r.status == "rewritten" for r in result.records)
    int8_matrices = [
        t for t in result.model.graph.initializer
        if t.data_type == TensorProto.INT8 and len(t.dims) > 1
    ]  # fmt: skip
    assert len(int8_matrices) == len(layers)
    held_out = batches(resnet_style, count=2, seed=7)
    error = rel_l2(logits(resnet_style, held_out), logits(result.model, held_out))
    assert 0 < error < 0.08  # lossy: int8 is never exact, but close on a BN-folded ResNet
    before, after = analyse(resnet_style), analyse(result.model, {"input": [1, 3, 32, 32]})
    assert after.weight_bytes < 0.3 * before.weight_bytes  # int8 data counted, at 1 byte
    assert after.total_params >= 0.95 * before.total_params


def test_records_read_the_written_model_even_without_node_names(resnet_style):
    nameless = onnx.ModelProto()
    nameless.CopyFrom(resnet_style)
    for node in nameless.graph.node:
        node.name = ""
    result = quantize(nameless, batches(nameless))
    assert [r.status for r in result.records] == ["rewritten"] * 10
    names = [r.node for r in result.records]
    assert all(names) and len(set(names)) == 10  # named <op>_<index> as analyse names them


def test_per_tensor_and_int8_activations_are_options(resnet_style):
    calibration = batches(resnet_style)
    result = quantize(resnet_style, calibration, per_channel=False, activations="int8")
    graph.check_model(result.model)
    activation_types = {
        t.data_type
        for t in result.model.graph.initializer
        if t.name.endswith("zero_point") and "weight" not in t.name
    }
    assert TensorProto.INT8 in activation_types and TensorProto.UINT8 not in activation_types
    held_out = batches(resnet_style, count=2, seed=7)
    assert rel_l2(logits(resnet_style, held_out), logits(result.model, held_out)) < 0.15


def test_keep_leaves_named_layers_in_float(resnet_style):
    result = quantize(resnet_style, batches(resnet_style), keep="stem.conv,head.fc")
    kept = {r.node: r for r in result.records if r.status == "skipped"}
    assert set(kept) == {"stem.conv", "head.fc"}
    assert "keep" in kept["stem.conv"].reason
    by_name = {n.name: n for n in result.model.graph.node}
    dequantized = {n.output[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear"}
    assert by_name["stem.conv"].input[1] not in dequantized
    assert by_name["stage1.block0.conv1"].input[1] in dequantized


def test_records_and_layer_table_give_each_layer_its_precision_and_weight_bytes(resnet_style):
    result = quantize(resnet_style, batches(resnet_style), keep="stem.conv")
    report = {"passes": [{"name": "int8", "records": [r.to_dict() for r in result.records]}]}
    column = report_rows.LAYER_COLUMNS.index("precision")
    precision = {row[1]: row[column] for row in report_rows.layer_rows(report)}
    assert precision["stem.conv"] == "float" and precision["head.fc"] == "int8"
    assert set(precision.values()) == {"int8", "float"} and len(precision) == 10
    weights = {r.node: r.details for r in result.records}
    float_conv, int8_conv = weights["stem.conv"], weights["stage1.block0.conv1"]
    assert float_conv["weight_bytes_after"] == float_conv["weight_bytes_before"]
    # 1 byte a weight instead of 4, plus a scale and zero point per output channel.
    assert 0.25 < int8_conv["weight_bytes_after"] / int8_conv["weight_bytes_before"] < 0.3
    charted = {node for node, _, _ in report_rows.weight_bytes(report)}
    assert charted == set(precision)


def test_each_int8_layer_is_timed_in_float_and_int8_for_the_report(resnet_style):
    result = quantize(resnet_style, batches(resnet_style), keep="head.fc")
    timed = {r.node: r.details["timing"] for r in result.records if "timing" in r.details}
    in_int8 = {r.node for r in result.records if r.details["int8"]}
    assert set(timed) == in_int8 and "head.fc" not in timed  # a float layer is not timed
    assert all(t["original_ms"] > 0 and t["rewritten_ms"] > 0 for t in timed.values())
    assert "each timed alone in float and in int8" in result.summary["notes"][-1]
    report = {"passes": [{"name": "int8", "records": [r.to_dict() for r in result.records]}]}
    column = report_rows.LAYER_COLUMNS.index("latency ms before → after")
    latency = {row[1]: row[column] for row in report_rows.layer_rows(report)}
    assert "→" in latency["stem.conv"] and latency["head.fc"] == ""
    assert len(report_rows.record_latencies(report)) == len(in_int8)
    untimed = quantize(resnet_style, batches(resnet_style), time_layers=False)
    assert not any("timing" in r.details for r in untimed.records)


def test_opset_11_model_is_converted_to_13_and_runs(resnet_style):
    old = onnx.ModelProto()
    old.CopyFrom(resnet_style)
    old.opset_import[0].version = 11
    result = quantize(old, batches(old))
    assert result.summary["converted_from_opset"] == 11
    assert graph.default_opset(result.model) == 13
    graph.check_model(result.model)
    held_out = batches(old, count=1, seed=3)
    assert rel_l2(logits(old, held_out), logits(result.model, held_out)) < 0.08


def test_unused_weight_listed_as_graph_input_does_not_break_the_quantizer(resnet_style):
    # Old exporters (IR 3) list every weight as a graph input; a pass that replaces a layer
    # leaves its weight behind until cleanup, and onnxruntime's pre-processing then failed
    # (SqueezeNet after svd, called through the API).
    old = onnx.ModelProto()
    old.CopyFrom(resnet_style)
    old.ir_version = 3
    stale = onnx.numpy_helper.from_array(np.ones(4, np.float32), "stale_weight")
    old.graph.initializer.append(stale)
    for weight in old.graph.initializer:
        old.graph.input.append(
            onnx.helper.make_tensor_value_info(weight.name, weight.data_type, weight.dims)
        )
    result = quantize(old, batches(old))
    graph.check_model(result.model)
    assert result.summary["quantized_layers"] == 10


def test_calibration_samples_are_capped(resnet_style):
    result = quantize(resnet_style, batches(resnet_style, count=3), samples=6)
    assert result.summary["calibration_samples"] == 6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"activations": "int4"}, "activations must be one of"),
        ({"ranges": "mse"}, "ranges must be one of"),
        ({"samples": 0}, "samples must be at least 1"),
        ({"keep": "no.such.node"}, "keep names no node"),
    ],
)
def test_bad_options_are_one_clear_error(resnet_style, options, message):
    with pytest.raises(CompressError, match=message):
        quantize(resnet_style, batches(resnet_style, count=1), **options)


def test_without_calibration_data_it_says_what_it_needs(resnet_style):
    with pytest.raises(CompressError, match="needs calibration data"):
        quantize(resnet_style, None)


def test_cli_composes_svd_then_int8(tmp_path, resnet_style):
    from onnxcompress.cli import main

    source = tmp_path / "resnet_style.onnx"
    io.save_model(resnet_style, source)
    data = tmp_path / "data.npz"
    np.savez(data, input=np.random.default_rng(0).random((32, 3, 32, 32), np.float32))
    out = tmp_path / "out.onnx"
    code = main(
        [str(source), "--passes", "svd,int8", "--opt", "svd.target_macs=0.7", "--data", str(data)]
        + ["-o", str(out), "-q"]
    )
    assert code == 0
    model = io.load_model(out)
    graph.check_model(model)
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert len([n for n in model.graph.node if n.op_type == "Conv"]) > 8  # svd split some


def _cifar_test_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` CIFAR-10 test JPEGs of every 10th class-ordered image, decoded."""
    from PIL import Image

    packed = np.load(SHARED_DATA / "cifar10" / "test_jpeg.npz")
    picks = np.linspace(0, len(packed["y"]) - 1, count).astype(int)
    jpeg, offsets = packed["jpeg"], packed["offsets"]
    images = [
        np.asarray(Image.open(stdio.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())))
        for i in picks
    ]
    x = (np.stack(images).astype(np.float32) - CIFAR_MEAN) / CIFAR_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), packed["y"][picks]


def test_resnet20_keeps_its_cifar10_accuracy():
    model = io.load_model(shared_model("resnet20_cifar10.onnx"))
    x, y = _cifar_test_images(400)
    calibration = [{"input": x[i : i + 50]} for i in range(0, 200, 50)]
    evaluation = [{"input": x[i : i + 50]} for i in range(200, 400, 50)]
    result = quantize(model, calibration)
    graph.check_model(result.model)
    name = model.graph.output[0].name
    before = np.concatenate([run_model(model, [b])[name] for b in evaluation]).argmax(1)
    after = np.concatenate([run_model(result.model, [b])[name] for b in evaluation]).argmax(1)
    assert (before == y[200:]).mean() > 0.75  # the data and preprocessing are right
    assert (after == before).mean() >= 0.96
    assert abs((after == y[200:]).mean() - (before == y[200:]).mean()) <= 0.02


@pytest.mark.parametrize("ranges", ["entropy", "percentile"])
def test_other_range_methods_run_and_stay_close(resnet_style, ranges):
    result = quantize(resnet_style, batches(resnet_style, count=2), ranges=ranges)
    graph.check_model(result.model)
    held_out = batches(resnet_style, count=1, seed=5)
    assert rel_l2(logits(resnet_style, held_out), logits(result.model, held_out)) < 0.15


def test_svd_gemm_with_bias_then_int8():
    """svd of a Gemm that has a C writes a first Gemm with a zero C; a one-element C made
    onnxruntime's per-channel quantizer fail (found by auto's int8 rounds), so it is as wide
    as that Gemm's output."""
    model = fixtures.mlp()
    shapes = {"input": [8, 64]}
    data = random_inputs(model, shapes, count=4, seed=0)
    context = PassContext(input_shapes=shapes, calibration=data)
    svd = get_pass("svd")
    factored = svd.run(model, svd.make_options({"rank": 16, "never_slower": False}), context)
    assert factored.changed
    result = SPEC.run(factored.model, SPEC.make_options({}), context)
    graph.check_model(result.model)
    assert result.summary["quantized_layers"] >= 4
    before, after = (
        run_model(factored.model, data)["logits"],
        run_model(result.model, data)["logits"],
    )
    assert rel_l2(before, after) < 0.1


# -- a float16 model: upcast first, as `--passes upcast,int8` ------------------------------


def _float16_run(model, **options):
    shapes = graph.resolve_input_shapes(model, {"input": [4, 3, 32, 32]})
    context = PassContext(input_shapes=shapes, calibration=random_inputs(model, shapes, count=4))
    return SPEC.run(model, SPEC.make_options(options), context), context


def test_float16_model_is_upcast_first_exactly_as_upcast_then_int8(resnet_style):
    half = fixtures.half_precision(resnet_style)
    result, context = _float16_run(half)
    upcast = get_pass("upcast")
    by_hand = SPEC.run(upcast.run(half, upcast.make_options({}), context).model,
                       SPEC.make_options({}), context)  # fmt: skip
    assert result.model == by_hand.model
    assert "upcast to float32 first" in result.summary["notes"][0]  # then the timing's note
    assert result.summary["upcast"]["boundary casts"] == 2
    assert not any(t.data_type == TensorProto.FLOAT16 for t in result.model.graph.initializer)
    assert result.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    # What the upcast avoids: int8 of the float16 file as given is larger than the file itself.
    as_given, _ = _float16_run(half, upcast="false")
    assert "upcast" not in as_given.summary
    assert result.model.ByteSize() < half.ByteSize() < as_given.model.ByteSize()


def test_cli_int8_of_a_float16_model_says_it_upcast(tmp_path, resnet_style):
    from onnxcompress.cli import main

    half, model = fixtures.half_precision(resnet_style), tmp_path / "half.onnx"
    onnx.save(half, model)
    data, report = tmp_path / "x.npz", tmp_path / "r.json"
    shapes = graph.resolve_input_shapes(half, {"input": [8, 3, 32, 32]})
    np.savez(data, input=random_inputs(half, shapes, count=1)[0]["input"])
    args = ["--passes", "int8", "--data", data, "-o", tmp_path / "o.onnx", "--report", report]
    code = main([str(a) for a in [model, *args, "--no-bench", "-q"]])
    stated = json.loads(report.read_text())
    assert code == (1 if stated["verdict"]["kind"] == "broken" else 0)
    entry = stated["passes"][0]
    assert entry["summary"]["upcast"]["to"] == "float32"
    assert (tmp_path / "o.onnx").stat().st_size < model.stat().st_size
