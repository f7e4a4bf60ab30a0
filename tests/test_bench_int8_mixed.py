"""benchmarks/int8_mixed.py: the 'whole only' model quantizes exactly the layers the method
left whole, and the table gives ratios and drops against the original."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks import int8_mixed
from models import fixtures
from onnxcompress import graph
from onnxcompress.passkit import PassContext
from onnxcompress.validate import random_inputs


def test_whole_only_keeps_every_factor_in_float():
    model = fixtures.resnet_style()
    shapes = graph.resolve_input_shapes(model, {"input": [2, 3, 32, 32]})
    context = PassContext(shapes, calibration=random_inputs(model, shapes, count=2, seed=0))
    models = int8_mixed.build(SimpleNamespace(model=model), context, ["svd"], ["0.5"])
    assert list(models) == [
        "original", "int8", "svd@0.5", "svd@0.5+int8", "svd@0.5+int8 whole only"
    ]  # fmt: skip
    factors = set(int8_mixed.factor_nodes(models["svd@0.5"]))
    assert factors
    mixed = models["svd@0.5+int8 whole only"]
    dequantized = {n.output[0] for n in mixed.graph.node if n.op_type == "DequantizeLinear"}
    layers = [n for n in mixed.graph.node if n.op_type in ("Conv", "Gemm")]
    quantized = {n.name for n in layers if n.input[1] in dequantized}
    assert quantized and not quantized & factors
    assert {n.name for n in layers} - quantized == factors


def test_table_gives_ratios_and_drops():
    scores = {"original": {"top1": 80.0}, "x": {"top1": 78.5}}
    timing = {"original": {"median_ms": 2.0}, "x": {"median_ms": 1.0}}
    lines = int8_mixed.table(dict.fromkeys(scores), scores, timing).splitlines()
    assert lines[2] == "| original | 1.000 | 80.00 | +0.00 |"
    assert lines[3] == "| x | 0.500 | 78.50 | -1.50 |"
