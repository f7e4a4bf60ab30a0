"""Shared test helpers: where the real models live, and quiet onnxruntime."""

from pathlib import Path

import onnxruntime
import pytest

onnxruntime.set_default_logger_severity(3)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_MODELS = SHARED / "models"

# Input shapes the real models need pinned (their other dynamic dims are a leading batch).
SHARED_MODEL_PINS = {
    "ppocr_mobile_v2.0_cls.onnx": {"x": [1, 3, 48, 192]},
    "silero_vad_16k_op15.onnx": {"input": [1, 512]},
}


def shared_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"{path} not present (the shared folder sits beside the repo)")
    return path


def shared_model_names() -> list[str]:
    return sorted(p.name for p in SHARED_MODELS.glob("*.onnx")) if SHARED_MODELS.exists() else []
