"""benchmarks/window_size.py: every model gets a ratio per way of timing, and the table gives
each trial's ratios and the median gaps to the paired windows."""

from __future__ import annotations

from benchmarks import window_size
from models import fixtures
from onnxcompress.validate import random_inputs

SHAPES = {"input": [1, 3, 32, 32]}


def test_trial_times_each_model_three_ways(monkeypatch):
    monkeypatch.setattr(window_size, "WINDOW_SECONDS", 0.0)
    monkeypatch.setattr(window_size, "RETIME_WINDOWS", 2)
    original = fixtures.vgg_style()
    feeds = random_inputs(original, SHAPES, count=1, seed=0)[0]
    found = window_size.trial(original, {"a": original, "b": original}, feeds, 1)
    assert set(found) == {"a", "b"}
    for ways in found.values():
        assert set(ways) == set(window_size.WAYS) and all(v > 0 for v in ways.values())


def test_table_gives_every_trial_and_the_median_gaps():
    trials = [
        {"int8": {"pair": 0.50, "together": 0.60, "long": 0.55}},
        {"int8": {"pair": 0.52, "together": 0.54, "long": 0.52}},
        {"int8": {"pair": 0.50, "together": 0.56, "long": 0.50}},
    ]
    lines = window_size.table(trials).splitlines()
    assert lines[0].count("trial") == 9 and lines[0].endswith("| together − pair | long − pair |")
    assert lines[2].startswith("| int8 | 0.500 | 0.600 | 0.550 | 0.520 |")
    assert lines[2].endswith("| +0.060 | +0.000 |")
