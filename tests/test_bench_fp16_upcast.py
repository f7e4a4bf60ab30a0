"""benchmarks/fp16_upcast.py: the models it compares with a float16 file, and its table."""

from __future__ import annotations

from onnx import TensorProto

from benchmarks import fp16_upcast
from models import fixtures
from onnxcompress import graph, layers
from onnxcompress.passkit import PassContext
from onnxcompress.validate import random_inputs

SHAPES = {"input": [1, 3, 32, 32]}


def test_build_gives_the_file_its_upcast_and_three_int8_models_all_on_float16_input():
    model = layers.named_copy(fixtures.half_precision(fixtures.resnet_style()))
    batches = fp16_upcast.half(random_inputs(fixtures.resnet_style(), SHAPES, count=2, seed=0))
    models = fp16_upcast.build(model, PassContext(SHAPES, calibration=batches))
    labels = list(models)
    assert labels[:4] == ["float16 (as shipped)", "upcast", "int8", "upcast,int8"]
    assert labels[4].startswith("upcast,int8, in float: stem.conv")
    for candidate in models.values():
        graph.check_model(candidate)
        assert candidate.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_table_gives_ratios_to_the_float16_file_and_top1_deltas():
    models = {"float16 (as shipped)": None, "upcast": None}
    timing = {"float16 (as shipped)": {"median_ms": 2.0}, "upcast": {"median_ms": 1.5}}
    text = fp16_upcast.table(models, {"float16 (as shipped)": 70.0, "upcast": 70.5}, timing)
    assert text.splitlines()[2] == "| float16 (as shipped) | 1.000 | 2.00 | 70.00 | +0.00 |"
    assert text.splitlines()[3] == "| upcast | 0.750 | 1.50 | 70.50 | +0.50 |"
