"""Fixture models: valid ONNX, run in onnxruntime, seeded, and equal to the committed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from models.build import build_all
from models.fixtures import FIXTURES

ort.set_default_logger_severity(3)

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
NAMES = sorted(FIXTURES)
EXPECTED_OUTPUT = {
    "vgg_style": ("logits", (3, 10)),
    "resnet_style": ("logits", (3, 10)),
    "mobilenet_style": ("logits", (3, 10)),
    "mlp": ("logits", (3, 10)),
    "transformer_block": ("hidden", (3, 16, 64)),
}


@pytest.fixture(scope="module")
def built() -> dict[str, onnx.ModelProto]:
    return {name: build() for name, build in FIXTURES.items()}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def test_registry_names() -> None:
    assert set(FIXTURES) == set(EXPECTED_OUTPUT)


@pytest.mark.parametrize("name", NAMES)
def test_passes_full_check_and_strict_shape_inference(built, name: str) -> None:
    model = built[name]
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


@pytest.mark.parametrize("name", NAMES)
def test_runs_in_onnxruntime(built, name: str) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        built[name].SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    (inp,) = session.get_inputs()
    assert inp.shape[0] == "batch"
    shape = [3, *inp.shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    (out,) = session.run(None, {inp.name: x})
    out_name, out_shape = EXPECTED_OUTPUT[name]
    assert session.get_outputs()[0].name == out_name
    assert out.shape == out_shape
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    # He scaling keeps activations O(1): not vanished, not exploded.
    assert 0.1 < float(out.std()) < 100.0


@pytest.mark.parametrize("name", NAMES)
def test_committed_file_matches_builder(built, name: str) -> None:
    committed = (MODELS_DIR / f"{name}.onnx").read_bytes()
    assert committed == built[name].SerializeToString(), (
        f"models/{name}.onnx differs from its builder; run `python models/build.py`"
    )
    assert len(committed) < 1_000_000


@pytest.mark.parametrize("name", NAMES)
def test_seed_determines_weights(built, name: str) -> None:
    build = FIXTURES[name]
    assert build(seed=0).SerializeToString() == built[name].SerializeToString()
    same, other = _weights(built[name]), _weights(build(seed=1))
    assert list(same) == list(other)
    float_names = [k for k, v in same.items() if v.dtype == np.float32 and v.size > 1]
    assert float_names
    assert all(not np.array_equal(same[k], other[k]) for k in float_names)


def test_build_script_writes_every_fixture(tmp_path: Path) -> None:
    paths = build_all(tmp_path)
    assert sorted(p.name for p in paths) == [f"{n}.onnx" for n in NAMES]
    for path in paths:
        assert path.read_bytes() == (MODELS_DIR / path.name).read_bytes()
