"""Mean compensation: without a refit, a consumer keeps its output mean on the calibration rows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass

from onnxcompress.channels.mean_compensation import removed_mean_shift
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model

SPEC = get_pass("channels")
SHAPES = {"x": [4, 3, 10, 10]}


def _model(consumer: str, seed: int = 0) -> onnx.ModelProto:
    """Conv(3→8, 3×3) → Relu → consumer (Conv 8→5 without padding, or Flatten + Gemm)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) + 1.0, "b1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
    ]
    if consumer == "conv":
        inits.append(
            numpy_helper.from_array(rng.standard_normal((5, 8, 3, 3)).astype(np.float32), "w2")
        )
        nodes.append(helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5, 8, 8])
    else:
        inits.append(
            numpy_helper.from_array(rng.standard_normal((800, 5)).astype(np.float32), "w2")
        )
        inits.append(numpy_helper.from_array(rng.standard_normal((1, 5)).astype(np.float32), "c2"))
        nodes.append(helper.make_node("Flatten", ["r"], ["f"], name="flatten"))
        nodes.append(
            helper.make_node("Gemm", ["f", "w2", "c2"], ["y"], name="fc", alpha=0.5, beta=2.0)
        )
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 10, 10])
    g = helper.make_graph(nodes, "g", [x], [out], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _calibration(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 3, 10, 10)).astype(np.float32)} for _ in range(3)]


def test_removed_mean_shift_is_the_columns_times_the_means():
    columns = np.array([[1.0, 2.0], [0.0, -1.0]])
    assert removed_mean_shift(columns[:, :, None], np.array([[3.0], [0.5]])).tolist() == [4.0, -0.5]


@pytest.mark.parametrize("consumer", ["conv", "gemm"])
def test_without_refit_the_consumer_keeps_its_output_mean_on_the_calibration_rows(consumer):
    model, calibration = _model(consumer), _calibration(1)
    options = SPEC.make_options({"ratio": 0.5, "importance": "l2", "refit": False})
    context = PassContext(input_shapes=SHAPES, calibration=calibration)
    shifted = SPEC.run(model, options, context)
    plain = SPEC.run(model, options, PassContext(input_shapes=SHAPES))  # no data: no shift
    original = run_model(model, calibration)["y"]
    mean = original.mean(axis=tuple(i for i in range(original.ndim) if i != 1))
    for result, should_match in ((shifted, True), (plain, False)):
        y = run_model(result.model, calibration)["y"]
        found = y.mean(axis=tuple(i for i in range(y.ndim) if i != 1))
        close = np.allclose(found, mean, rtol=1e-4, atol=1e-4 * np.abs(mean).max())
        assert close == should_match
    modes = {r["mode"] for rec in shifted.records for r in rec.details.get("refit", {}).values()}
    assert modes == {"mean shift"}
