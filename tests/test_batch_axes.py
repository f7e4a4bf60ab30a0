"""Which axis holds the samples: with unnamed dynamic dims the pins and the data decide, not a
guess of axis 0 for every input (issue 27: a voice-activity model re-exported without names)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.calibration import batch_axes, calibration_inputs, load_npz_inputs
from onnxcompress.errors import CompressError
from onnxcompress.graph import resolve_input_shapes
from onnxcompress.runtime import run_model
from tests.test_cli import one_error_line, run_cli

PINS = {"audio": [1, 8], "state": [2, 1, 4]}
SR = np.array(16000, np.int64)


def vad_like(state_first: bool = False, rate: bool = True) -> onnx.ModelProto:
    """prob = sum(audio) * sr, state_out = state + prob: audio [?, ?], state [2, ?, 4] and a
    scalar int64 sr, all dynamic dims unnamed (`dim {}`), like silero re-exported without names.
    The add broadcasts prob over state's axis 1, so state must be cut on that axis."""
    value = helper.make_tensor_value_info
    inputs = [
        value("audio", TensorProto.FLOAT, [None, None]),
        value("state", TensorProto.FLOAT, [2, None, 4]),
        value("sr", TensorProto.INT64, []),
    ]
    if state_first:
        inputs = [inputs[1], inputs[0], inputs[2]]
    nodes = [
        helper.make_node("ReduceSum", ["audio", "one"], ["total"], keepdims=1),
        helper.make_node("Cast", ["sr"], ["rate"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["total", "rate"], ["prob"]),
    ]
    if not rate:  # no int input: random data can stand in for every input
        inputs, nodes = inputs[:-1], [nodes[0], helper.make_node("Identity", ["total"], ["prob"])]
    nodes += [
        helper.make_node("Unsqueeze", ["prob", "zero"], ["lifted"]),
        helper.make_node("Add", ["state", "lifted"], ["state_out"]),
    ]
    pairs = ("one", 1), ("zero", 0)
    axes = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in pairs]
    outputs = [
        value("prob", TensorProto.FLOAT, [None, 1]),
        value("state_out", TensorProto.FLOAT, [2, None, 4]),
    ]
    graph = helper.make_graph(nodes, "vad_like", inputs, outputs, axes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    assert all(not d.HasField("dim_param") for d in model.graph.input[0].type.tensor_type.shape.dim)
    return model


def vad_arrays(samples: int = 6, state_samples: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    state_samples = samples if state_samples is None else state_samples
    return {
        "audio": rng.uniform(-1, 1, (samples, 8)).astype(np.float32),
        "state": rng.standard_normal((2, state_samples, 4)).astype(np.float32),
        "sr": SR,
    }


def test_unnamed_dims_are_cut_on_the_axis_the_data_shows(tmp_path):
    model, arrays = vad_like(), vad_arrays()
    np.savez(tmp_path / "vad.npz", **arrays)
    shapes = resolve_input_shapes(model, PINS)
    batches, _ = load_npz_inputs(tmp_path / "vad.npz", model, shapes, batch_size=4)
    assert [batch["audio"].shape for batch in batches] == [(4, 8), (2, 8)]
    assert [batch["state"].shape for batch in batches] == [(2, 4, 4), (2, 2, 4)]
    restored = np.concatenate([batch["state"] for batch in batches], axis=1)
    assert np.array_equal(restored, arrays["state"])
    prob = np.concatenate([run_model(model, [batch])["prob"] for batch in batches])
    assert np.allclose(prob[:, 0], arrays["audio"].sum(1) * 16000, rtol=1e-5)


@pytest.mark.parametrize("state_first", [False, True])
def test_batch_axes_from_the_pins_and_from_the_data(state_first):
    model = vad_like(state_first)
    shapes = resolve_input_shapes(model, PINS)
    want = {"audio": 0, "state": 1, "sr": None}
    assert batch_axes(model, shapes) == want
    assert batch_axes(model, shapes, vad_arrays()) == want


def test_random_calibration_counts_samples_on_the_batch_axis():
    model = vad_like(state_first=True)
    shapes = resolve_input_shapes(model, PINS)
    calibration = calibration_inputs(model, shapes, count=3, fixed={"sr": SR})
    assert len(calibration.batches) == 3  # batches of one sample: the pinned batch is 1, not 2
    assert "batch axis: state 1, audio 0" in calibration.source


def test_data_calibration_names_the_batch_axis(tmp_path):
    np.savez(tmp_path / "vad.npz", **vad_arrays())
    model = vad_like()
    shapes = resolve_input_shapes(model, PINS)
    calibration = calibration_inputs(model, shapes, data=tmp_path / "vad.npz")
    assert calibration.source == "file vad.npz (6 samples; batch axis: audio 0, state 1)"


def test_named_batch_dims_are_not_restated():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [x])
    graph.output[0].name = "y"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calibration = calibration_inputs(model, resolve_input_shapes(model), count=2)
    assert "batch axis" not in calibration.source


@pytest.mark.parametrize(
    "arrays, message",
    [
        (vad_arrays(6, state_samples=5), "different sample counts: audio 6, state 5"),
        (
            {**vad_arrays(), "state": np.zeros((3, 6, 4), np.float32)},
            r"'state' has shape \[3, 6, 4\], expected \[2, 'N', 4\]",
        ),
    ],
)
def test_unnamed_dims_with_data_that_does_not_fit(tmp_path, arrays, message):
    model = vad_like()
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CompressError, match=message):
        load_npz_inputs(tmp_path / "bad.npz", model, resolve_input_shapes(model, PINS))


def test_ambiguous_batch_axis_is_refused(tmp_path):
    """x [?, ?] pinned 4,4 with data [4, 4] cut in batches of 2: either axis could hold them."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 4), np.float32))
    shapes = resolve_input_shapes(model, {"x": [4, 4]})
    with pytest.raises(CompressError, match=r"which axis of input 'x'.*--input-shape x:1,4"):
        load_npz_inputs(tmp_path / "x.npz", model, shapes, batch_size=2)
    batches, _ = load_npz_inputs(tmp_path / "x.npz", model, shapes)  # one batch: no choice made
    assert [batch["x"].shape for batch in batches] == [(4, 4)]


def test_cli_runs_unnamed_dims_with_data_and_says_the_batch_axis(tmp_path, capsys):
    model_path, data, report = tmp_path / "vad.onnx", tmp_path / "vad.npz", tmp_path / "r.json"
    onnx.save(vad_like(), model_path)
    np.savez(data, **vad_arrays(8))
    pins = ("--input-shape", "audio:1,8", "--input-shape", "state:2,1,4")
    args = (model_path, "--passes", "identity", "--data", data, *pins, "--no-bench", "-q")
    code = run_cli(*args, "-o", tmp_path / "out.onnx", "--report", report)
    out = capsys.readouterr().out
    assert code == 0
    written = json.loads(report.read_text())
    assert written["batch_axes"] == {"audio": 0, "state": 1, "sr": None}
    assert "batch axis: audio 0, state 1" in written["calibration"]
    assert "batch axis: audio 0, state 1" in " ".join(out.split())


def test_cli_refuses_mismatched_unnamed_data_in_one_line(tmp_path, capsys):
    model_path, data = tmp_path / "vad.onnx", tmp_path / "vad.npz"
    onnx.save(vad_like(), model_path)
    np.savez(data, **vad_arrays(8, state_samples=5))
    pins = ("--input-shape", "audio:1,8", "--input-shape", "state:2,1,4")
    args = (model_path, "--passes", "identity", "--data", data, *pins)
    code = run_cli(*args, "-o", tmp_path / "o.onnx")
    assert code == 2
    assert "different sample counts: audio 8, state 5" in one_error_line(capsys)


def test_cli_without_data_takes_the_batch_axis_from_the_pins(tmp_path, capsys):
    model_path, report = tmp_path / "vad.onnx", tmp_path / "r.json"
    onnx.save(vad_like(state_first=True, rate=False), model_path)
    pins = ("--input-shape", "audio:1,8", "--input-shape", "state:2,1,4")
    args = (model_path, "--passes", "identity", *pins, "--calib-count", "3", "--no-bench", "-q")
    assert run_cli(*args, "-o", tmp_path / "out.onnx", "--report", report) == 0
    written = json.loads(report.read_text())
    assert written["batch_axes"] == {"state": 1, "audio": 0}
    assert written["calibration"].endswith("; batch axis: state 1, audio 0")
    assert written["validation"]["samples"] == 3
    assert "batch axis: state 1, audio 0" in " ".join(capsys.readouterr().out.split())


def test_random_inputs_say_when_the_batch_axis_is_a_guess():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [x])
    graph.output[0].name = "y"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calibration = calibration_inputs(model, resolve_input_shapes(model, {"x": [4, 4]}), count=8)
    assert calibration.source.endswith("; batch axis: x 0 (guessed; 1 also fits)")
    assert len(calibration.batches) == 2
