"""The samples distill trains and chooses its weights on: calibration batches of one shape are
joined and split by sample; batches of different shapes (sentences padded per batch) are held
out whole beside a training set, and refused without one."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.samples import ArraySource
from onnxcompress.train.samples import (
    held_count,
    held_out_labels,
    pieces,
    training_and_held_out,
)


def _batches(lengths: list[int]) -> list[dict[str, np.ndarray]]:
    return [{"ids": np.full((4, length), length, dtype=np.int64)} for length in lengths]


def test_batches_of_one_shape_are_split_by_sample():
    context = PassContext({"ids": [4, 8]}, _batches([8, 8, 8, 8, 8]))
    source, held = training_and_held_out(context, 0.1, seed=0)
    assert isinstance(held, dict) and held_count(held) == 2
    assert source.count == 18


def test_batches_of_different_shapes_are_held_out_whole_beside_a_training_set():
    training = ArraySource({"ids": np.zeros((40, 128), dtype=np.int64)})
    batches = _batches([5, 9, 7, 12, 6, 30, 8, 11, 10, 4])
    context = PassContext({"ids": [4, 8]}, batches, training=training)
    source, held = training_and_held_out(context, 0.2, seed=3)
    assert source is training
    assert isinstance(held, list) and len(held) == 2
    assert all(any(piece is batch for batch in batches) for piece in held)
    assert held_count(held) == 8
    again = training_and_held_out(context, 0.2, seed=3)[1]
    assert [piece["ids"].shape for piece in again] == [piece["ids"].shape for piece in held]


def test_batches_of_different_shapes_without_a_training_set_are_refused():
    context = PassContext({"ids": [4, 8]}, _batches([5, 9, 7]))
    with pytest.raises(CompressError, match="differ in shape"):
        training_and_held_out(context, 0.2, seed=0)


def test_joined_samples_are_cut_in_order_and_lists_kept():
    joined = {"x": np.arange(10)}
    cut = pieces(joined, 4)
    assert [list(piece["x"]) for piece in cut] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    given = _batches([3, 5])
    assert pieces(given, 1) is given


def test_held_out_labels_follow_the_held_out_samples():
    rows = np.arange(40)
    calibration = [{"x": rows[i : i + 8, None].astype(np.float32)} for i in range(0, 40, 8)]
    context = PassContext({"x": [8, 1]}, calibration, labels=rows + 100)
    _, held = training_and_held_out(context, 0.2, seed=5)
    labels = held_out_labels(context, 0.2, seed=5)
    assert list(labels) == list(held["x"][:, 0].astype(int) + 100)
    assert held_out_labels(PassContext({"x": [8, 1]}, calibration), 0.2, seed=5) is None
