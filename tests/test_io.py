"""Loading (bad files give one clear CompressError), atomic writes, external data."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import io
from onnxcompress.errors import CompressError


def _tiny_model(weight_elements=16):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight_elements])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight_elements])
    w = numpy_helper.from_array(np.arange(weight_elements, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_round_trip(tmp_path):
    path = tmp_path / "m.onnx"
    written = io.save_model(_tiny_model(), path)
    assert written == path.stat().st_size
    assert io.load_model(path) == _tiny_model()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "no temp file left behind"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "file is empty"),
        (b"this is not a protobuf at all \xff\xfe", "not a readable ONNX model|not an ONNX model"),
    ],
)
def test_bad_files(tmp_path, content, words):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(CompressError, match=words):
        io.load_model(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.onnx"
    data = _tiny_model(4096).SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match="truncated or not ONNX"):
        io.load_model(path)


def test_missing_and_folder(tmp_path):
    with pytest.raises(CompressError, match="no such file"):
        io.load_model(tmp_path / "nope.onnx")
    with pytest.raises(CompressError, match="not a file"):
        io.load_model(tmp_path)


def test_unwritable_folder(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        io.save_model(_tiny_model(), tmp_path / "missing" / "m.onnx")
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere; permission case not testable as root")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(CompressError, match="not writable"):
        io.save_model(_tiny_model(), locked / "m.onnx")


def test_large_models_go_to_external_data(tmp_path, monkeypatch):
    # A 2 GB model is too slow for a test; lower the threshold to exercise the same path.
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    path = tmp_path / "big.onnx"
    model = _tiny_model(4096)
    io.save_model(model, path)
    (data,) = tmp_path.glob("big.onnx.*.data")  # named by its content
    assert path.stat().st_size < 4096 * 4
    loaded = io.load_model(path)
    np.testing.assert_array_equal(
        numpy_helper.to_array(loaded.graph.initializer[0]), np.arange(4096, dtype=np.float32)
    )
    onnx.checker.check_model(str(path))
