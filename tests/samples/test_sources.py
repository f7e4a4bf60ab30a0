"""Training sample sources: every sample once an epoch, orders fixed by the seed, .npz files
read one at a time, images decoded a batch at a time in the in-memory order, fixed-size
batches across epochs, and one-line refusals of data that does not fit the model."""

from __future__ import annotations

import gc
import itertools
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcompress.errors import CompressError
from onnxcompress.images import load_images, parse_preprocess
from onnxcompress.samples import ArraySource, steady_batches
from onnxcompress.samples.npz_stream import NpzStream
from onnxcompress.samples.training_set import training_source, watched_training_set
from tests.test_validate import write_images

SHAPES = {"x": [1, 2, 3]}
DTYPES = {"x": np.dtype(np.float32)}


def _model(shape=("batch", 2, 3)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _numbered(first: int, count: int) -> np.ndarray:
    """`count` samples of shape (2, 3) whose values all equal their number, from `first`."""
    numbers = np.arange(first, first + count, dtype=np.float32)
    return np.broadcast_to(numbers[:, None, None], (count, 2, 3)).copy()


def _ids(pieces) -> list[int]:
    return [int(v) for piece in pieces for v in piece.inputs["x"][:, 0, 0]]


def _npz_files(folder, counts, labels=True) -> list:
    folder.mkdir(exist_ok=True)
    paths, first = [], 0
    for index, count in enumerate(counts):
        path = folder / f"part{index}.npz"
        extra = {"labels": np.arange(first, first + count)} if labels else {}
        np.savez(path, x=_numbered(first, count), **extra)
        paths.append(path)
        first += count
    return paths


def test_an_array_source_gives_every_sample_once_an_epoch_in_a_seeded_order():
    source = ArraySource({"x": _numbered(0, 50)}, np.arange(50))
    first = list(source.epoch(0, seed=3, size=8))
    assert sorted(_ids(first)) == list(range(50))
    assert [len(p.labels) for p in first] == [8] * 6 + [2]
    assert all(np.array_equal(p.labels, p.inputs["x"][:, 0, 0]) for p in first)
    assert _ids(source.epoch(0, seed=3, size=8)) == _ids(first)
    assert _ids(source.epoch(1, seed=3, size=8)) != _ids(first)
    assert _ids(source.epoch(0, seed=4, size=8)) != _ids(first)


def test_steady_batches_are_full_and_run_through_the_epochs_in_order():
    source = ArraySource({"x": _numbered(0, 10)})
    batches = list(itertools.islice(steady_batches(source, 4, seed=1), 5))
    assert [len(b.inputs["x"]) for b in batches] == [4] * 5
    epochs = _ids(source.epoch(0, 1, 4)) + _ids(source.epoch(1, 1, 4))
    assert _ids(batches) == epochs[:20]  # the third batch takes 2 of epoch 0 and 2 of epoch 1


def test_steady_batches_never_exceed_the_samples():
    source = ArraySource({"x": _numbered(0, 3)})
    batch = next(steady_batches(source, 64, seed=0))
    assert sorted(_ids([batch])) == [0, 1, 2]


def test_npz_files_give_every_sample_once_an_epoch_with_their_labels(tmp_path):
    stream = NpzStream(_npz_files(tmp_path, [7, 0, 12, 5]), DTYPES, SHAPES)
    assert stream.count == 24 and stream.labelled
    for epoch in range(3):
        pieces = list(stream.epoch(epoch, seed=0, size=4))
        assert sorted(_ids(pieces)) == list(range(24))
        assert all(np.array_equal(p.labels, p.inputs["x"][:, 0, 0]) for p in pieces)
        assert _ids(stream.epoch(epoch, seed=0, size=4)) == _ids(pieces)
    assert _ids(stream.epoch(0, 0, 4)) != _ids(stream.epoch(1, 0, 4))


def test_npz_files_are_read_one_at_a_time(tmp_path, monkeypatch):
    stream = NpzStream(_npz_files(tmp_path, [9, 6, 11]), DTYPES, SHAPES)
    alive: list[weakref.ref] = []
    real = NpzStream.read

    def read(self, index):
        gc.collect()
        assert all(ref() is None for ref in alive), "a file still in memory"
        samples = real(self, index)
        alive.append(weakref.ref(samples.inputs["x"]))
        return samples

    monkeypatch.setattr(NpzStream, "read", read)
    for epoch in range(2):
        batches = steady_batches(stream, 4, seed=epoch)
        assert len(_ids(itertools.islice(batches, 13))) == 52
    assert len(alive) >= 6  # every file read again each epoch


def test_one_npz_file_streams_as_the_same_arrays_in_memory(tmp_path):
    (path,) = _npz_files(tmp_path, [30])
    stream = NpzStream([path], DTYPES, SHAPES)
    memory = ArraySource({"x": _numbered(0, 30)}, np.arange(30))
    for epoch in range(2):
        assert _ids(stream.epoch(epoch, 5, 8)) == _ids(memory.epoch(epoch, 5, 8))


def test_an_image_folder_streams_as_the_same_images_decoded_up_front(tmp_path):
    write_images(tmp_path / "images", count=7)
    (tmp_path / "labels.txt").write_text("".join(f"img{i}.png {i + 3}\n" for i in range(7)))
    spec = "scale=1/255"
    model = _model(("batch", 3, 4, 4))
    stream = training_source(
        model, {"x": [1, 3, 4, 4]}, [tmp_path / "images"], spec, tmp_path / "labels.txt"
    )
    images, labels, _ = load_images(
        tmp_path / "images",
        parse_preprocess(spec),
        [1, 3, 4, 4],
        labels_path=tmp_path / "labels.txt",
    )
    memory = ArraySource({"x": images}, labels)
    for epoch in range(2):
        streamed, held = list(stream.epoch(epoch, 2, 3)), list(memory.epoch(epoch, 2, 3))
        assert len(streamed) == len(held) == 3
        for ours, theirs in zip(streamed, held, strict=True):
            assert np.array_equal(ours.inputs["x"], theirs.inputs["x"])
            assert np.array_equal(ours.labels, theirs.labels)


def test_a_folder_of_npz_files_and_several_paths_make_one_source(tmp_path):
    _npz_files(tmp_path / "a", [4, 5], labels=False)
    np.savez(tmp_path / "more.npz", x=_numbered(100, 3))
    source = training_source(_model(), SHAPES, [tmp_path / "a", tmp_path / "more.npz"])
    assert source.count == 12 and not source.labelled
    assert sorted(_ids(source.epoch(0, 0, 5))) == [*range(9), 100, 101, 102]


def _refusal(tmp_path, paths, labels=None, model=None) -> str:
    with pytest.raises(CompressError) as caught:
        training_source(model or _model(), SHAPES, paths, "scale=1", labels)
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"y": np.zeros((4, 2, 3), np.float32)}, "no array for input(s) x"),
        ({"x": np.zeros((4, 3, 2), np.float32)}, "shape [4, 3, 2], expected ['N', 2, 3]"),
        ({"x": np.zeros((2, 3), np.float32)}, "expected ['N', 2, 3]"),
        ({"x": np.zeros((4, 2, 3), np.float64)}, "takes float32, the file has float64"),
        ({"x": np.zeros((4, 2, 3), np.float32), "labels": np.zeros(3, int)}, "one per sample"),
    ],
)
def test_npz_files_that_do_not_fit_the_model_are_refused_in_one_line(tmp_path, arrays, words):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert words in _refusal(tmp_path, [tmp_path / "bad.npz"])


def test_other_training_sets_are_refused_in_one_line(tmp_path):
    _npz_files(tmp_path / "npz", [2])
    write_images(tmp_path / "images", count=2)
    np.savez(tmp_path / "unlabelled.npz", x=_numbered(0, 2))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    npz, images = tmp_path / "npz", tmp_path / "images"
    assert "not both" in _refusal(tmp_path, [npz, images])
    assert "every training file or in none" in _refusal(
        tmp_path, [npz, tmp_path / "unlabelled.npz"]
    )
    assert "no such file or folder" in _refusal(tmp_path, [tmp_path / "missing"])
    assert "expected an .npz file or a folder" in _refusal(tmp_path, [tmp_path / "notes.txt"])
    assert "no .npz or image files" in _refusal(tmp_path, [tmp_path / "empty"])
    assert "--train-labels goes with image folders" in _refusal(tmp_path, [npz], labels="l.txt")
    assert "images need a 4-D input" in _refusal(tmp_path, [images])
    with pytest.raises(CompressError, match="^--train-data needs --preprocess"):
        training_source(_model(("batch", 3, 4, 4)), {"x": [1, 3, 4, 4]}, [images])
    with pytest.raises(CompressError, match="give --train-data too"):
        watched_training_set(_model(), SHAPES, [], None, "labels.txt")
