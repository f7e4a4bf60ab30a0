"""Helpers of the tests that train the mlp fixture (distill, prune/rdprune retrain_steps):
seeded input batches, the run's context, weights by name and the error on unseen inputs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model

SHAPES = {"input": [32, 64]}


def batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((32, 64)).astype(np.float32)} for _ in range(count)]


def training_context(teacher: onnx.ModelProto, calibration=None, **fields) -> PassContext:
    """Eight batches of 32 samples (or `calibration`), seed 0, one thread, `teacher` original."""
    calibration = batches(8, 0) if calibration is None else calibration
    return PassContext(SHAPES, calibration, seed=0, threads=1, original=teacher, **fields)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def held_out_error(model: onnx.ModelProto, teacher: onnx.ModelProto) -> float:
    """Relative L2 of the logits against the teacher's on inputs no training saw."""
    unseen = batches(4, 99)
    ours, theirs = run_model(model, unseen)["logits"], run_model(teacher, unseen)["logits"]
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
