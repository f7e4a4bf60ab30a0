"""benchmarks/threads.py: every thread setting times every model, ratios to the first."""

from __future__ import annotations

from benchmarks import threads
from tests.conftest import REPO

MODELS = [REPO / "models" / "resnet_style.onnx", REPO / "models" / "vgg_style.onnx"]


def test_every_setting_times_every_model(capsys):
    assert threads.main([*map(str, MODELS), "--rounds", "1", "--runs", "2", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| threads | spinning | resnet_style.onnx | vgg_style.onnx |"
    settings = [line.split(" | ")[:2] for line in lines[2:]]
    assert settings == [["| 1", "on"], ["| 1", "off"], ["| 2", "on"], ["| 2", "off"]]
    assert all("ms (1.00)" in line.split(" | ")[2] for line in lines[2:])


def test_batch_pins_the_leading_dim_only():
    from onnxcompress import io

    pins = threads.batch_pins(io.load_model(MODELS[0]), 8)
    assert pins == {"input": [8, 3, 32, 32]}
