"""benchmarks/int8_float_layers.py: the three int8 models leave in float nothing, the layer
alone, and its float region; the table gives each model's ratio and drop."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks import int8_float_layers
from models import fixtures
from onnxcompress import graph, layers
from onnxcompress.passkit import PassContext
from onnxcompress.validate import random_inputs, run_model

SHAPES = {"input": [1, 3, 32, 32]}


def _float_layers(model) -> set[str]:
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name
        for n in model.graph.node
        if n.op_type in graph.LAYER_OPS and n.input[1] not in dequantized
    }


def _bench():
    model = fixtures.resnet_style()
    batches = random_inputs(model, SHAPES, count=2, seed=0)

    def score(candidate, threads):  # a stand-in metric: how often class 0 wins
        (logits,) = run_model(candidate, batches).values()
        return {"top1": float((logits.argmax(axis=-1) == 0).mean() * 100)}

    return model, batches, score


def test_the_three_int8_models_leave_in_float_none_the_layer_and_its_region():
    model, batches, _ = _bench()
    model = layers.named_copy(model)
    context = PassContext(SHAPES, calibration=batches)
    models = int8_float_layers.build(model, context, "stem.conv")
    labels = list(models)
    region = ["stem.conv", "stem.bn", "stem.relu", "stage1.block0.conv1"]
    assert labels == [
        "original", "int8", "int8 keep=stem.conv", f"int8, in float: {', '.join(region)}"
    ]  # fmt: skip
    assert _float_layers(models["int8"]) == set()
    assert _float_layers(models["int8 keep=stem.conv"]) == {"stem.conv"}
    assert _float_layers(models[labels[3]]) == {"stem.conv", "stage1.block0.conv1"}
    for quantized in list(models.values())[1:]:
        graph.check_model(quantized)


def test_measure_prints_the_layer_alone_and_a_row_per_model():
    model, batches, score = _bench()
    bench = SimpleNamespace(
        name="resnet_style", model=model, input_shapes=SHAPES, calibration=batches,
        score=score, metric="top1", latency_inputs={1: batches[0]},
    )  # fmt: skip
    args = SimpleNamespace(threads=1, repeats=3)
    text = int8_float_layers.measure(bench, None, args)
    assert "`stem.conv` timed alone: float " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| model | latency b1 | top1 | Δ |"
    assert rows[1].startswith("| original | 1.000 |") and rows[1].endswith("| +0.00 |")
    assert len(rows) == 5
