"""Models over protobuf's 2 GB limit, at a small scale: the limit is lowered to a few hundred
kB (io.EXTERNAL_DATA_THRESHOLD) and the ONNX checker, shape inference and onnxruntime are made
to refuse a model in memory above it, as the real ones refuse one over 2 GB. The pipeline must
then take the same paths a real 2.2 GB model takes (files, skeletons, sessions from paths).
`benchmarks/large_model.py` runs the real thing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.large import write_matmul_stack
from onnxcompress import io, large_models, model_copies
from onnxcompress.pipeline import CompressOptions, compress

LIMIT = 200_000
HIDDEN = 256  # 262 kB per weight: every layer's weight alone is over the limit


class TooLarge(Exception):
    """What protobuf says of a message over 2 GB."""


@pytest.fixture
def lowered_limit(monkeypatch):
    """Below LIMIT as before; above it, a model handed over in memory fails as a 2 GB one."""
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", LIMIT)

    def refusing(function, payload_of):
        def guarded(*args, **kwargs):
            payload = payload_of(args)
            size = payload.ByteSize() if isinstance(payload, onnx.ModelProto) else None
            if isinstance(payload, bytes):
                size = len(payload)
            if size is not None and size >= LIMIT:
                raise TooLarge("Failed to serialize proto")
            return function(*args, **kwargs)

        return guarded

    first = lambda args: args[0]  # noqa: E731
    monkeypatch.setattr(onnx.checker, "check_model", refusing(onnx.checker.check_model, first))
    inference = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refusing(inference, first))
    monkeypatch.setattr(ort, "InferenceSession", refusing(ort.InferenceSession, first))
    return LIMIT


@pytest.fixture
def stack(tmp_path):
    return write_matmul_stack(tmp_path / "stack.onnx", layers=3, hidden=HIDDEN, rank=16)


def _data(tmp_path, rows=64):
    x = np.random.default_rng(1).standard_normal((rows, HIDDEN)).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, x=x)
    return path, x


def test_the_guard_refuses_what_the_pipeline_must_avoid(stack, lowered_limit):
    model = io.load_model(stack)
    assert large_models.too_large(model)
    with pytest.raises(TooLarge):
        onnx.checker.check_model(model)
    with pytest.raises(TooLarge):
        ort.InferenceSession(model.SerializeToString())


def test_svd_with_calibration_through_files(stack, tmp_path, lowered_limit):
    data, x = _data(tmp_path)
    out = tmp_path / "out.onnx"
    options = CompressOptions(
        passes=["svd"], pass_options={"svd": {"target_macs": 0.5}}, output=str(out),
        data=str(data), bench_repeats=3,
    )  # fmt: skip
    result = compress(stack, options)
    report = result.report
    assert report["after"]["total_macs"] < 0.6 * report["before"]["total_macs"]
    assert report["validation"]["validated"] and report["benchmark"]["speedup"] > 0
    written = list(tmp_path.glob("out.onnx.*.data"))
    assert len(written) == 1, "the result's weights go to one external data file"
    assert report["output_bytes"] == out.stat().st_size + written[0].stat().st_size
    # The written model and its data run in onnxruntime, from the path, as validated.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(stack), providers=["CPUExecutionProvider"])
    got, want = session.run(None, {"x": x})[0], original.run(None, {"x": x})[0]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 0.2
    assert rel == pytest.approx(report["validation"]["worst_rel_l2"], rel=0.5)


def test_identity_keeps_every_weight(stack, tmp_path, lowered_limit):
    out = tmp_path / "same.onnx"
    result = compress(stack, CompressOptions(passes=["identity"], output=str(out), bench=False))
    assert result.report["validation"]["worst_rel_l2"] == 0.0
    original, written = io.load_model(stack), io.load_model(out)
    for before, after in zip(original.graph.initializer, written.graph.initializer, strict=True):
        assert before.raw_data == after.raw_data


def test_skeleton_keeps_structure_without_weight_bytes(stack):
    model = io.load_model(stack)
    shell = model_copies.skeleton(model)
    assert shell.ByteSize() < 20_000 < model.ByteSize()
    assert [t.name for t in shell.graph.initializer] == [t.name for t in model.graph.initializer]
    assert [list(t.dims) for t in shell.graph.initializer] == [
        list(t.dims) for t in model.graph.initializer
    ]
    assert shell.graph.node == model.graph.node and shell.opset_import == model.opset_import
    inferred = onnx.shape_inference.infer_shapes(shell, strict_mode=True)
    assert {vi.name for vi in inferred.graph.value_info} >= {"m0", "a1", "h1"}


def test_onnxc_of_a_large_model_keeps_its_graph_small(stack, tmp_path, lowered_limit):
    from onnxcompress.coding import onnxc_reader

    data, _ = _data(tmp_path)
    out = tmp_path / "out.onnxc"
    options = CompressOptions(
        passes=["svd"], pass_options={"svd": {"target_macs": 0.5}}, output=str(out),
        data=str(data), bench=False,
    )  # fmt: skip
    result = compress(stack, options)
    assert len(_onnxc_graph(out)) < LIMIT, "every weight is coded: the graph stays small"
    decoded = onnxc_reader.load_onnxc(out)
    for before, after in zip(
        result.model.graph.initializer, decoded.graph.initializer, strict=True
    ):
        assert before.raw_data == after.raw_data


def _onnxc_graph(path) -> bytes:
    """The serialised graph section of a `.onnxc` file (layout in coding/onnxc.py)."""
    import zstandard

    from onnxcompress.coding.entropy import unpack_sections
    from onnxcompress.coding.onnxc import HEADER, MAGIC

    body = path.read_bytes()[len(MAGIC) + HEADER.size :]
    return zstandard.ZstdDecompressor().decompress(unpack_sections(body)[0])
