"""How many calibration samples `auto`'s sensitivity runs use. Each candidate of each layer
runs the model (from that layer on) over them, so that stage costs candidates × samples × one
sample's run. A candidate's damage is the squared error summed over every output value of
every sample: a model with dense outputs (a depth or segmentation map: 163,200 values a
sample for the 192×640 depth decoder of issue 26) has as many values in a few samples as a
classifier in thousands. So the default is 64 samples, or as many as give OUTPUT_VALUES
output values, whichever is fewer, but at least MIN_SAMPLES; deterministic (a count, not a
timing), and the report says so (docs/decisions.md#autooptionssensitivity_samples)."""

from __future__ import annotations

import math

import onnx

from onnxcompress.analyse import ModelAnalysis
from onnxcompress.layers import tensor_shapes

DEFAULT_SAMPLES = 64
MIN_SAMPLES = 16
# Output values a sensitivity run reads at most by default: 64 samples of 4,096 values, so
# classifiers and embedders (ResNet-20: 10, SqueezeNet: 1,000, MiniLM: 384 a sample) keep 64.
OUTPUT_VALUES = DEFAULT_SAMPLES * 4096


def values_per_sample(model: onnx.ModelProto, analysis: ModelAnalysis) -> int:
    """Output values one sample makes: the graph outputs' elements over the pinned batch."""
    shapes = tensor_shapes(model, analysis)
    batch = max((shape[0] for shape in analysis.input_shapes.values() if shape), default=1)
    total = sum(math.prod(shapes.get(out.name, [0])) for out in model.graph.output)
    return max(1, total // max(batch, 1))


def default_samples(values: int) -> int:
    """DEFAULT_SAMPLES, or fewer where they would read over OUTPUT_VALUES output values (at
    least MIN_SAMPLES)."""
    return max(MIN_SAMPLES, min(DEFAULT_SAMPLES, math.ceil(OUTPUT_VALUES / max(values, 1))))


def summary(values: int, samples: int) -> dict:
    why = (
        f"{DEFAULT_SAMPLES} samples would read {DEFAULT_SAMPLES * values:,} output values; "
        f"{samples} read {samples * values:,} (at most {OUTPUT_VALUES:,} by default, at least "
        f"{MIN_SAMPLES} samples)"
        if samples < DEFAULT_SAMPLES
        else f"the default {DEFAULT_SAMPLES}"
    )
    return {"values_per_sample": values, "default_samples": samples, "why": why}
