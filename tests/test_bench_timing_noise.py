"""benchmarks/timing_noise.py: window ratios of one model over another, and their spread."""

from __future__ import annotations

import pytest

from benchmarks import timing_noise
from tests.conftest import REPO

MODEL = REPO / "models" / "vgg_style.onnx"


def test_a_model_over_itself_is_near_one_in_every_window(capsys):
    argv = [str(MODEL), str(MODEL), "--threads", "1", "--windows", "3", "--seconds", "0.01"]
    assert timing_noise.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("| window s | median | std |")
    cells = lines[3].split(" | ")
    assert cells[0] == "| 0.01" and len(cells[-1].split(", ")) == 3
    assert 0.5 < float(cells[1]) < 2.0  # the same model: a ratio near 1, whatever the noise


def test_summary_of_known_ratios():
    row = timing_noise.summary(1.0, [0.5, 0.6, 0.4, 0.5, 0.5, 0.5])
    assert row["median"] == 0.5 and row["range"] == (0.4, 0.6)
    assert row["std_of_median_of_3"] == pytest.approx(0.0)  # medians of (0.5,0.6,0.4), (0.5,)*3
