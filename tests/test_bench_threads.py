"""benchmarks/threads.py: every thread and spinning setting, alone and interleaved, times
every model; ratios to the first."""

from __future__ import annotations

from benchmarks import threads
from tests.conftest import REPO

MODELS = [REPO / "models" / "resnet_style.onnx", REPO / "models" / "vgg_style.onnx"]


def test_every_setting_times_every_model(capsys):
    argv = [*map(str, MODELS), "--rounds", "1", "--runs", "2", "--warmup", "0", "--threads", "2"]
    assert threads.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (
        "| trial | threads | sessions | spinning | resnet_style.onnx | vgg_style.onnx "
        "| ratio gap to deployed |"
    )
    cells = [line.strip("| ").split(" | ") for line in lines[2:]]
    settings = [cell[:4] for cell in cells]
    assert settings == [
        ["0", "2", "alone", "on"],
        ["0", "2", "alone", "off"],
        ["0", "2", "interleaved", "stop"],
        ["0", "2", "interleaved", "off"],
        ["0", "2", "interleaved", "on"],
    ]
    assert all(cell[4].endswith("ms (1.000)") for cell in cells)
    assert cells[0][-1] == "0.000"  # the deployed setting's gap to itself


def test_batch_pins_the_leading_dim_only():
    from onnxcompress import io

    pins = threads.batch_pins(io.load_model(MODELS[0]), 8)
    assert pins == {"input": [8, 3, 32, 32]}
