"""The pipeline keeps held-out samples away from the passes that fit on data."""

from dataclasses import dataclass

import numpy as np
import pytest

import passes
from onnxcompress.calibration import Calibration
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassResult, PassSpec
from onnxcompress.pipeline import CompressOptions, compress, split_holdout
from tests.conftest import REPO


def _calibration(batches, source="file d.npz (8 samples)"):
    data = [{"x": np.full((2, 3), i, np.float32)} for i in range(batches)]
    return Calibration(data, np.arange(2 * batches), source)


def test_holdout_splits_batches_and_labels():
    fit, held = split_holdout(_calibration(4), 0.25)
    assert [b["x"][0, 0] for b in fit.batches] == [0, 1, 2]
    assert [b["x"][0, 0] for b in held.batches] == [3]
    assert list(fit.labels) == [0, 1, 2, 3, 4, 5] and list(held.labels) == [6, 7]
    assert "2 held-out samples" in held.source and "first 6 samples" in fit.source


@pytest.mark.parametrize(
    ("calibration", "holdout"),
    [(_calibration(4), 0.0), (_calibration(1), 0.25), (_calibration(4, "random (seed 0)"), 0.5)],
)
def test_no_split_without_room_or_user_data(calibration, holdout):
    fit, held = split_holdout(calibration, holdout)
    assert fit is calibration and held is calibration


def test_bad_holdout():
    with pytest.raises(CompressError, match="--holdout"):
        split_holdout(_calibration(4), 1.0)


@dataclass(frozen=True)
class SpyOptions:
    pass


def test_passes_never_see_the_held_out_samples(tmp_path, monkeypatch):
    seen = []

    def spy(model, options, context):
        seen.append([float(b["input"].sum()) for b in context.calibration])
        return PassResult(model, False)

    monkeypatch.setitem(passes.PASSES, "spy", PassSpec("spy", spy, SpyOptions, "spy"))
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    inputs = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.savez(data, input=inputs)
    options = CompressOptions(
        passes=["spy"], output=str(tmp_path / "o.onnx"), data=str(data), bench=False
    )
    result = compress(REPO / "models" / "vgg_style.onnx", options)
    assert len(seen[0]) == 6  # 8 batches of 1: 6 to fit, 2 held out
    assert seen[0] == pytest.approx([float(x.sum()) for x in inputs[:6]])
    assert result.report["validation"]["samples"] == 2
