"""benchmark: figures per model, repeats honoured, runs interleaved round-robin."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import benchmark
from onnxcompress.benchmark import benchmark_models, speedup
from onnxcompress.errors import CompressError


def dense(width: int, seed: int = 0) -> onnx.ModelProto:
    """y = relu(x @ W) on x [1, 16], W [16, width]."""
    weight = np.random.default_rng(seed).standard_normal((16, width)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


INPUTS = {"x": np.ones((1, 16), np.float32)}


def test_figures_for_every_model():
    models = {"before": dense(256), "after": dense(8).SerializeToString()}
    bench = benchmark_models(models, INPUTS, threads=1, warmup=2, repeats=7)
    assert set(bench) == {"before", "after"}
    for figures in bench.values():
        assert figures["median_ms"] > 0
        assert figures["p10_ms"] <= figures["median_ms"] <= figures["p90_ms"]
        assert figures["iqr_ms"] >= 0
        assert figures["runs"] == 7
        assert figures["threads"] == 1
        assert figures["spinning"] == "stop"
        assert figures["onnxruntime"] == ort.__version__
        assert figures["cpu_count"] >= 1
    assert speedup(bench, "before", "after") == pytest.approx(
        bench["before"]["median_ms"] / bench["after"]["median_ms"]
    )


def test_min_seconds_adds_rounds():
    bench = benchmark_models({"m": dense(8)}, INPUTS, warmup=0, repeats=2, min_seconds=0.05)
    assert bench["m"]["runs"] > 2


def test_runs_are_interleaved(monkeypatch):
    calls: list[str] = []
    real_session = benchmark.timing_session

    models = {"wide": dense(64), "narrow": dense(8)}
    names = {id(model): name for name, model in models.items()}

    class RecordingSession:
        def __init__(self, model, threads, spinning):
            self.session = real_session(model, threads, spinning)
            self.name = names[id(model)]

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, output_names, feeds):
            calls.append(self.name)
            return self.session.run(output_names, feeds)

    monkeypatch.setattr(benchmark, "timing_session", RecordingSession)
    benchmark_models(models, INPUTS, warmup=3, repeats=5)
    assert calls[:6] == ["wide"] * 3 + ["narrow"] * 3  # warm-up first, model by model
    # then rounds: each model twice in turn (an untimed run warms its caches, one timed)
    assert calls[6:] == ["wide", "wide", "narrow", "narrow"] * 5


@pytest.mark.parametrize("spinning", sorted(benchmark.SPINNING))
def test_spinning_settings_reach_the_session(spinning):
    session = benchmark.timing_session(dense(8), 2, spinning)
    options = session.get_session_options()
    for key, value in benchmark.SPINNING[spinning].items():
        assert options.get_session_config_entry(key) == value
    # "stop" spins as a deployed session does (onnxruntime's default), but only during a run
    spins = options.get_session_config_entry("session.intra_op.allow_spinning")
    assert spins == ("0" if spinning == "off" else "1")


def test_unknown_spinning_is_an_error():
    with pytest.raises(CompressError, match="spinning: one of stop, off, on, got 'fast'"):
        benchmark_models({"m": dense(8)}, INPUTS, spinning="fast")


def test_missing_input_is_an_error():
    with pytest.raises(CompressError, match="no input data for x"):
        benchmark_models({"m": dense(8)}, {"input": INPUTS["x"]})
