"""auto's default sensitivity sample count: 64, or for dense outputs as many samples as hold
OUTPUT_VALUES output values (at least 16); and auto on a small monodepth2-style depth decoder
(issue 26) through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.exports import DEPTH_SKIPS, depth_decoder
from models.fixtures import resnet_style
from onnxcompress.analyse import analyse
from onnxcompress.auto.sample_budget import (
    DEFAULT_SAMPLES,
    MIN_SAMPLES,
    default_samples,
    values_per_sample,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("values", "wanted"),
    [
        (10, DEFAULT_SAMPLES),  # a classifier
        (4096, DEFAULT_SAMPLES),  # exactly OUTPUT_VALUES at 64
        (4097, DEFAULT_SAMPLES),  # ceil: 64 still
        (8192, 32),
        (10880, 25),  # the depth decoder at 64x128
        (163_200, MIN_SAMPLES),  # at 192x640: 2 would do, the floor holds
    ],
)
def test_default_samples(values, wanted):
    assert default_samples(values) == wanted


def test_values_per_sample_counts_every_output_over_the_batch():
    depth = depth_decoder(height=64, width=128)
    shapes = {i.name: [2, *[d.dim_value for d in i.type.tensor_type.shape.dim][1:]] for i in
              depth.graph.input}  # fmt: skip
    assert values_per_sample(depth, analyse(depth, shapes)) == 64 * 128 + 32 * 64 + 16 * 32 + 8 * 16
    resnet = resnet_style()
    assert values_per_sample(resnet, analyse(resnet, {"input": [3, 3, 32, 32]})) == 10


def _depth_inputs(count: int, height: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"features.{i}": np.maximum(
            rng.standard_normal((count, c, height // down, width // down)), 0
        ).astype(np.float32)
        for i, (c, down) in enumerate(DEPTH_SKIPS)
    }


def test_auto_on_a_small_depth_decoder_uses_fewer_samples_and_says_why(tmp_path):
    source, data = tmp_path / "depth.onnx", tmp_path / "depth.npz"
    onnx.save(depth_decoder(height=64, width=128), source)
    np.savez(data, **_depth_inputs(48, 64, 128))
    out, report = tmp_path / "auto.onnx", tmp_path / "report.json"
    command = [
        sys.executable, "-m", "onnxcompress", str(source), "--passes", "auto",
        "--opt", "auto.target_macs=0.5", "--opt", "auto.methods=svd", "--data", str(data),
        "--no-bench", "-q", "-o", str(out), "--report", str(report),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    found = json.loads(report.read_text())["passes"][0]
    sensitivity = found["summary"]["auto"]["sensitivity"]
    assert sensitivity["default"]["default_samples"] == 25  # 10,880 output values a sample
    assert sensitivity["samples"] == 25  # of the 36 calibration samples left after holdout
    assert "would read" in sensitivity["default"]["why"]
    assert found["summary"]["effective_options"]["sensitivity_samples"] == 25
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    feeds = {k: v[:2] for k, v in _depth_inputs(2, 64, 128).items()}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    want = ort.InferenceSession(str(source), options).run(None, feeds)
    got = ort.InferenceSession(str(out), options).run(None, feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.isfinite(g).all() for g in got)
