"""The .onnxc file: exact round trips, sizes, pre-coded blocks, clean errors, CLI decode."""

import json
import logging
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass
from onnxcompress.passes.prune import prune

from models.fixtures import resnet_style
from onnxcompress import graph, io
from onnxcompress.cli import main
from onnxcompress.coding import onnxc as onnxc
from onnxcompress.coding import onnxc_reader as onnxc_reader
from onnxcompress.coding import onnxc_writer as onnxc_writer
from onnxcompress.coding.onnxc import CodedWeights, OnnxcError
from onnxcompress.coding.sparse_codec import decode_sparse, encode_sparse
from onnxcompress.passkit import PassContext
from tests.conftest import shared_model


def _pruned(sparsity=0.8, bits=None):
    spec = get_pass("prune")
    raw = {"sparsity": sparsity} | ({"quantize_bits": bits} if bits else {})
    return prune(resnet_style(), spec.make_options(raw), PassContext(input_shapes={})).model


def _initializers_equal(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert x.name == y.name
        left, right = numpy_helper.to_array(x), numpy_helper.to_array(y)
        assert left.dtype == right.dtype and left.shape == right.shape
        assert left.tobytes() == right.tobytes()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("bits", [None, 4])
def test_pruned_fixture_round_trip_is_exact(bits):
    model = _pruned(0.8, bits)
    decoded = onnxc_reader.decode_model(onnxc_writer.encode_model(model))
    _initializers_equal(model, decoded)
    assert decoded == model  # graph, metadata and every tensor field


def test_shared_real_model_round_trip_is_exact():
    # mnist_cntk stores its weights in float_data (not raw_data): restored in the same field.
    model = io.load_model(shared_model("mnist_cntk.onnx"))
    data = onnxc_writer.encode_model(model)
    decoded = onnxc_reader.decode_model(data)
    assert decoded == model
    assert onnxc_writer.coded_size(model)["coded_tensors"] >= 2


def test_pruned_model_is_much_smaller_than_plain_and_zstd():
    model = _pruned(0.8)
    size = onnxc_writer.coded_size(model)
    plain = onnxc_writer.reference_sizes(model.SerializeToString())
    assert size["total_bytes"] == len(onnxc_writer.encode_model(model))
    assert size["total_bytes"] < 0.5 * plain["bytes"]
    assert size["total_bytes"] < plain["zstd19"] and size["total_bytes"] < plain["gzip9"]
    assert size["graph_bytes"] + size["weight_bytes"] < size["total_bytes"]


def test_quantised_pruned_model_is_smaller_still():
    assert (
        onnxc_writer.coded_size(_pruned(0.8, 4))["total_bytes"]
        < onnxc_writer.coded_size(_pruned(0.8))["total_bytes"]
    )


def test_encoding_is_deterministic_and_does_not_touch_the_model():
    model = _pruned(0.5)
    snapshot = model.SerializeToString()
    assert onnxc_writer.encode_model(model) == onnxc_writer.encode_model(model)
    assert model.SerializeToString() == snapshot


def test_special_float_values_survive():
    values = np.array(
        [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -3.4e38, 1.0] * 20, dtype=np.float32
    )
    values[::7] = np.float32(np.nan)
    model = _single_initializer_model(values.reshape(8, 20))
    decoded = onnxc_reader.decode_model(onnxc_writer.encode_model(model))
    before = numpy_helper.to_array(model.graph.initializer[0]).view(np.uint32)
    after = numpy_helper.to_array(decoded.graph.initializer[0]).view(np.uint32)
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("field", ["raw_data", "int32_data"])
def test_float16_weights_are_coded_and_restored_in_their_field(field):
    values = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float16)
    values[values < 0.5] = 0  # sparse enough that coding pays
    if field == "raw_data":
        tensor = numpy_helper.from_array(values, "w")
    else:  # float16 bit patterns in int32_data, as some exporters write them
        bits = values.reshape(-1).view(np.uint16).astype(np.int32).tolist()
        tensor = helper.make_tensor("w", TensorProto.FLOAT16, list(values.shape), bits)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [16, 16])
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [tensor])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert onnxc_writer.coded_size(model)["coded_tensors"] == 1
    assert onnxc_reader.decode_model(onnxc_writer.encode_model(model)) == model


@st.composite
def sparse_tensors(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=4)))
    density = draw(st.sampled_from([0.0, 0.01, 0.2, 0.7, 1.0]))
    levels = draw(st.sampled_from([1, 3, 16, 5000, None]))
    if levels is None:
        values = rng.laplace(0, 0.1, shape)
    else:
        values = rng.choice(rng.normal(size=levels), size=shape)
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    return np.where(rng.random(shape) < density, values, 0.0).astype(dtype)


@given(st.lists(sparse_tensors(), min_size=1, max_size=3))
@settings(max_examples=60, deadline=None)
def test_sparse_codec_round_trip(arrays):
    named = {f"t{i}": a for i, a in enumerate(arrays)}
    decoded = decode_sparse(encode_sparse(named))
    assert list(decoded) == list(named)
    for name, array in named.items():
        assert decoded[name].dtype == array.dtype and decoded[name].shape == array.shape
        assert decoded[name].tobytes() == array.tobytes()


def test_sparse_codec_uses_few_bits_for_codebook_values():
    rng = np.random.default_rng(0)
    array = np.where(rng.random((256, 256)) < 0.2, rng.choice([-0.5, 0.25, 1.0], (256, 256)), 0)
    payload = encode_sparse({"w": array.astype(np.float32)})
    # 20 % density: ~0.72 bits/param of positions + ~1.5 bits per nonzero of values
    assert 8 * len(payload) < 256 * 256 * (0.75 + 0.2 * 1.6)


def _single_initializer_model(weight: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    g = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------------- pre-coded blocks


def test_matching_coded_block_is_used_as_given():
    model = _pruned(0.8, 4)
    name = model.graph.initializer[0].name
    array = numpy_helper.to_array(model.graph.initializer[0])
    block = CodedWeights("sparse", [name], encode_sparse({name: array}))
    data = onnxc_writer.encode_model(model, [block])
    assert block.payload in data
    assert onnxc_reader.decode_model(data) == model


def test_stale_coded_block_falls_back_to_sparse(caplog):
    model = _pruned(0.8)
    name = model.graph.initializer[0].name
    stale = numpy_helper.to_array(model.graph.initializer[0]) + np.float32(1.0)
    block = CodedWeights("sparse", [name], encode_sparse({name: stale}))
    with caplog.at_level(logging.WARNING):
        data = onnxc_writer.encode_model(model, [block])
    assert "changed after the pass" in caplog.text
    assert onnxc_reader.decode_model(data) == model


def test_block_for_unknown_tensor_or_codec_falls_back(caplog):
    model = _pruned(0.8)
    blocks = [
        CodedWeights("sparse", ["nope"], b""),
        CodedWeights("mystery", [model.graph.initializer[0].name], b"xx"),
    ]
    with caplog.at_level(logging.WARNING):
        data = onnxc_writer.encode_model(model, blocks)
    assert "no longer a weight" in caplog.text and "mystery" in caplog.text
    assert onnxc_reader.decode_model(data) == model


# ---------------------------------------------------------------- bad files


def _file():
    return onnxc_writer.encode_model(_pruned(0.8))


def test_corrupted_byte_is_a_checksum_error():
    data = bytearray(_file())
    data[len(data) // 2] ^= 0x40
    with pytest.raises(OnnxcError, match="checksum mismatch"):
        onnxc_reader.decode_model(bytes(data))


@pytest.mark.parametrize("keep", [0, 3, 10, 18, 100, -1])
def test_truncated_file(keep):
    data = _file()
    with pytest.raises(OnnxcError, match="truncated|not an .onnxc"):
        onnxc_reader.decode_model(data[:keep] if keep >= 0 else data[:-1])


def test_wrong_magic_future_version_and_trailing_bytes():
    data = _file()
    with pytest.raises(OnnxcError, match="not an .onnxc file"):
        onnxc_reader.decode_model(b"ONNXD" + data[5:])
    with pytest.raises(OnnxcError, match="not an .onnxc file"):
        onnxc_reader.decode_model(resnet_style().SerializeToString())
    future = data[:5] + bytes([onnxc.FORMAT_VERSION + 1]) + data[6:]
    with pytest.raises(
        OnnxcError, match=f"unsupported .onnxc format version {onnxc.FORMAT_VERSION + 1}"
    ):
        onnxc_reader.decode_model(future)
    with pytest.raises(OnnxcError, match="stray bytes"):
        onnxc_reader.decode_model(data + b"\0")


def _reframe(body: bytes, version: int = onnxc.FORMAT_VERSION) -> bytes:
    header = struct.pack("<BQI", version, len(body), zlib.crc32(body))
    return onnxc.MAGIC + header + body


def _checked_block(codec: bytes, payload: bytes, digest: bytes) -> bytes:
    """A version-2 block whose CRC matches its (edited) bytes: only the digest can object."""
    from onnxcompress.coding.entropy import pack_sections

    crc = struct.pack("<I", zlib.crc32(payload, zlib.crc32(codec)))
    return pack_sections([codec, payload, crc + digest])


def test_unknown_codec_and_inconsistent_body_are_clean_errors():
    from onnxcompress.coding.entropy import pack_sections, unpack_sections

    data = _file()
    parts = unpack_sections(data[18:])
    block = unpack_sections(parts[3])  # graph, typed names, padding, then the blocks
    nope = _checked_block(b"nope", block[1], block[2][4:])
    renamed = pack_sections([*parts[:3], nope, *parts[4:]])
    with pytest.raises(OnnxcError, match="unknown codec 'nope'"):
        onnxc_reader.decode_model(_reframe(renamed))
    missing = pack_sections(parts[:-1])  # a tensor's block dropped: its data is nowhere
    with pytest.raises(OnnxcError, match="no data for tensor"):
        onnxc_reader.decode_model(_reframe(missing))
    garbage = pack_sections([b"not zstd", *parts[1:]])
    with pytest.raises(OnnxcError, match="corrupted"):
        onnxc_reader.decode_model(_reframe(garbage))
    assert issubclass(OnnxcError, onnxc.CompressError)


# ---------------------------------------------------------------- files, CLI, pipeline


def test_cli_decode_round_trip_and_default_output(tmp_path, capsys):
    model = _pruned(0.8)
    source = tmp_path / "m.onnxc"
    io.save_onnxc(model, source)
    before = io.file_sha256(source)
    assert main(["decode", str(source)]) == 0
    assert onnx.load(tmp_path / "m.onnx") == model
    assert main(["decode", str(source), "-o", str(tmp_path / "x.onnx")]) == 0
    assert onnx.load(tmp_path / "x.onnx") == model
    assert io.file_sha256(source) == before
    assert io.load_model(source) == model  # load_model reads .onnxc transparently


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_cli_decode_bad_inputs_exit_2(tmp_path, capsys):
    data = bytearray(_file())
    bad = tmp_path / "bad.onnxc"
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    assert main(["decode", str(bad)]) == 2
    assert "checksum mismatch" in _one_error_line(capsys)
    assert not (tmp_path / "bad.onnx").exists()

    short = tmp_path / "short.onnxc"
    short.write_bytes(_file()[:50])
    assert main(["decode", str(short)]) == 2
    assert "truncated" in _one_error_line(capsys)

    plain = tmp_path / "plain.onnx"
    plain.write_bytes(resnet_style().SerializeToString())
    assert main(["decode", str(plain), "-o", str(tmp_path / "out.onnx")]) == 2
    assert "not an .onnxc file" in _one_error_line(capsys)

    assert main(["decode", str(tmp_path / "missing.onnxc")]) == 2
    assert "no such file" in _one_error_line(capsys)

    same = tmp_path / "same.onnx"  # an .onnxc named .onnx: the default picks another name
    same.write_bytes(_file())
    assert main(["decode", str(same), "-o", str(same)]) == 2
    assert "is the input file" in _one_error_line(capsys)
    assert main(["decode", str(same)]) == 0
    assert same.read_bytes() == _file() and (tmp_path / "same-2.onnx").is_file()


def test_pipeline_writes_onnxc_with_reference_sizes(tmp_path, capsys):
    source = tmp_path / "in.onnx"
    io.save_model(resnet_style(), source)
    out, report = tmp_path / "out.onnxc", tmp_path / "r.json"
    args = [str(source), "--passes", "prune", "--opt", "prune.sparsity=0.8"]
    args += ["-o", str(out), "--no-bench", "-q", "--report", str(report)]
    assert main(args) == 0
    data = json.loads(report.read_text())
    assert data["output_bytes"] == out.stat().st_size == data["sizes"]["onnxc_bytes"]
    for which in ("original", "result"):
        assert set(data["sizes"][which]) == {"bytes", "gzip9", "zstd19"}
    assert data["output_bytes"] < data["sizes"]["result"]["zstd19"]
    decoded = onnxc_reader.load_onnxc(out)
    graph.check_model(decoded)
    assert "zstd -19" in capsys.readouterr().out
    assert main(["analyse", str(out)]) == 0


def test_run_passes_collects_coded_weights():
    from onnxcompress.passkit import PassResult, PassSpec
    from onnxcompress.pipeline import run_passes

    model = _pruned(0.8)
    name = model.graph.initializer[0].name
    payload = encode_sparse({name: numpy_helper.to_array(model.graph.initializer[0])})
    block = CodedWeights("sparse", [name], payload)

    def coding_pass(m, options, context):
        return PassResult(m, False, artifacts={"coded_weights": [block]})

    @dataclass(frozen=True)
    class NoOptions:
        pass

    spec = PassSpec("coder", coding_pass, NoOptions, "test")
    coded: list = []
    result, reports = run_passes(
        model, [spec], {"coder": NoOptions()}, PassContext({}), lambda _: None, coded=coded
    )
    assert coded == [block] and reports[0]["name"] == "coder"
    assert block.payload in onnxc_writer.encode_model(result, coded)
