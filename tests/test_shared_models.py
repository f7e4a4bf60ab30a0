"""Every real model in ../shared/models goes through the whole flow with `identity` unchanged,
and analyse runs on it; BN folding is exact on the real models that have BN."""

import json

import numpy as np
import onnx
import pytest

from onnxcompress.pipeline import CompressOptions, compress
from tests.conftest import SHARED_MODEL_PINS, shared_model, shared_model_names

# silero's `sr` is an int64 sample rate: random values are not valid input, so give real ones.
SILERO_NPZ = {"sr": np.array(16000, dtype=np.int64)}
# fns_candy runs at 720×720: one sample keeps the suite fast.
FEW_SAMPLES = {"fns_candy.onnx": 1}


def _options(name, tmp_path, passes, **extra):
    data = None
    if name.startswith("silero"):
        data = tmp_path / "silero.npz"
        rng = np.random.default_rng(0)
        np.savez(
            data,
            input=rng.uniform(-1, 1, (2, 512)).astype(np.float32),
            state=np.zeros((2, 2, 128), np.float32),
            **SILERO_NPZ,
        )
    return CompressOptions(
        passes=passes,
        output=str(tmp_path / "out.onnx"),
        report=str(tmp_path / "r.json"),
        input_shapes=SHARED_MODEL_PINS.get(name, {}),
        data=str(data) if data else None,
        calibration_count=FEW_SAMPLES.get(name),
        bench=False,
        **extra,
    )


@pytest.mark.parametrize("name", shared_model_names())
def test_identity_keeps_outputs_and_writes_report(name, tmp_path):
    path = shared_model(name)
    result = compress(path, _options(name, tmp_path, ["identity"]))
    report = json.loads((tmp_path / "r.json").read_text())
    for stats in report["validation"]["outputs"].values():
        assert stats["max_abs"] == 0.0, (name, stats)
    assert report["before"]["total_macs"] == report["after"]["total_macs"] > 0
    written = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(written, full_check=True)
    assert written == onnx.load(path), "identity must write the model as it was"
    assert result.exit_code == 0


@pytest.mark.parametrize(
    ("name", "bn_count"), [("ultraface_rfb_320.onnx", 35), ("ppocr_mobile_v2.0_cls.onnx", 35)]
)
def test_fold_bn_exact_on_real_models(name, bn_count, tmp_path):
    path = shared_model(name)
    result = compress(path, _options(name, tmp_path, ["fold_bn"]))
    ops = [node.op_type for node in result.model.graph.node]
    assert "BatchNormalization" in [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("BatchNormalization") == 0
    folded = [r for r in result.report["passes"][0]["records"] if r["status"] == "rewritten"]
    assert sum(1 for r in folded if r["op"] == "BatchNormalization") == bn_count
    for stats in result.report["validation"]["outputs"].values():
        # Folding re-rounds each weight once in float32: differences stay at float precision.
        assert stats["rel_l2"] < 1e-5, stats
        assert stats["max_abs"] < 1e-4, stats
    assert result.report["after"]["total_params"] < result.report["before"]["total_params"]
