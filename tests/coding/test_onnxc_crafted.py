"""Hostile `.onnxc` files: crafted counts with valid checksums are refused fast and small,
every edit of a weight block is caught by the block's own check, format 1 is still read."""

import functools
import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import onnx
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnxcompress.passes import get_pass
from onnxcompress.passes.prune import prune

from models.fixtures import resnet_style
from onnxcompress import graph
from onnxcompress.cli import main
from onnxcompress.coding import onnxc as onnxc
from onnxcompress.coding import onnxc_reader as onnxc_reader
from onnxcompress.coding import onnxc_writer as onnxc_writer
from onnxcompress.coding.entropy import pack_ints, pack_sections, unpack_sections
from onnxcompress.coding.onnxc import OnnxcError
from onnxcompress.coding.surp_stream import VERSION as SURP_VERSION
from onnxcompress.passkit import PassContext

_START = len(onnxc.MAGIC) + 13  # magic, version u8, body length u64, CRC32 u32
_FIRST_BLOCK = 3  # graph, typed names, padding
# The reader's bound is 4 x this; before it, these cases took 0.3-1.3 GB (see the brief).
_HUGE = 4 * onnxc.DECODE_FLOOR


@functools.cache
def _pruned() -> onnx.ModelProto:
    spec = get_pass("prune")
    options = spec.make_options({"sparsity": 0.8})
    return prune(resnet_style(), options, PassContext(input_shapes={})).model


@functools.cache
def _rdpruned() -> tuple[onnx.ModelProto, list]:
    spec = get_pass("rdprune")
    model = resnet_style()
    options = spec.make_options({"sparsity": 0.8, "compare": False})
    result = spec.run(model, options, PassContext(graph.resolve_input_shapes(model)))
    return result.model, result.artifacts["coded_weights"]


# ---------------------------------------------------------------- crafting helpers


def _frame(parts: list[bytes], version: int = onnxc.FORMAT_VERSION) -> bytes:
    """A file around `parts` with a whole-file CRC that matches them."""
    body = pack_sections(parts)
    return onnxc.MAGIC + struct.pack("<BQI", version, len(body), zlib.crc32(body)) + body


def _block(codec: bytes, payload: bytes, digest: bytes) -> bytes:
    """A block whose CRC matches its bytes, as a careful editor would leave it."""
    crc = struct.pack("<I", zlib.crc32(payload, zlib.crc32(codec)))
    return pack_sections([codec, payload, crc + digest])


def _as_format_1(data: bytes) -> bytes:
    """The same file in format 1: no padding section, blocks without their own check."""
    parts = unpack_sections(data[_START:])
    blocks = [pack_sections(unpack_sections(block)[:2]) for block in parts[_FIRST_BLOCK:]]
    return _frame([parts[0], parts[1], *blocks], version=1)


def _block_index(parts: list[bytes], codec: bytes) -> int:
    return next(i for i in range(_FIRST_BLOCK, len(parts)) if unpack_sections(parts[i])[0] == codec)


def _set_dims(graph_section: bytes, name: str, dims: list[int]) -> bytes:
    model = onnx.ModelProto.FromString(zstandard.ZstdDecompressor().decompress(graph_section))
    tensor = onnxc.weight_tensors(model)[name]
    del tensor.dims[:]
    tensor.dims.extend(dims)
    packer = zstandard.ZstdCompressor(level=3, write_checksum=True)
    return packer.compress(model.SerializeToString())


def _one_symbol(count: int) -> bytes:
    """A categorical stream of `count` equal symbols: a few bytes, whatever the count."""
    return bytes([0]) + (pack_ints([1, 0, count]) if count else pack_ints([0]))


def _sparse_tensor(count: int, dims: list[int]) -> bytes:
    """The first sparse tensor replaced by one of `dims`: all zero, or `count` equal values."""
    parts = unpack_sections(onnxc_writer.encode_model(_pruned())[_START:])
    index = _block_index(parts, b"sparse")
    codec, payload, check = unpack_sections(parts[index])
    name = unpack_sections(unpack_sections(payload)[0])[0]
    header = pack_ints([TensorProto.FLOAT, len(dims), *dims, count])
    codebook = struct.pack(">I", 0x3F000000) if count else b""  # 0.5
    values = bytes([0]) + pack_sections([codebook, _one_symbol(count)])
    record = pack_sections([name, header, pack_sections([_one_symbol(count), b""]), values])
    parts[index] = _block(codec, pack_sections([record]), check[4:])
    parts[0] = _set_dims(parts[0], name.decode(), dims)
    return _frame(parts)


def _surp_payload(edit) -> bytes:
    """The rdprune fixture's file with its SuRP sections edited by `edit(meta, sections)`."""
    model, coded = _rdpruned()
    parts = unpack_sections(onnxc_writer.encode_model(model, coded)[_START:])
    index = _block_index(parts, b"surp")
    codec, payload, check = unpack_sections(parts[index])
    sections = unpack_sections(payload[5:])
    meta = json.loads(zlib.decompress(sections[0]))
    edit(meta, sections)
    if meta:
        sections[0] = zlib.compress(json.dumps(meta).encode())
    body = pack_sections(sections)
    payload = bytes([SURP_VERSION]) + struct.pack("<I", zlib.crc32(body)) + body
    parts[index] = _block(codec, payload, check[4:])
    return _frame(parts)


def _many_steps(meta: dict, sections: list[bytes]) -> None:
    meta.update(steps=_HUGE, refreshes=0)
    sections[1] = sections[1][: 20 + 4 * len(meta["names"])]
    sections[2] = pack_sections([_one_symbol(_HUGE), b""])  # every gap 0: free to code
    sections[3] = pack_sections([_one_symbol(0), b""])


def _huge_header(meta: dict, sections: list[bytes]) -> None:
    meta.clear()  # the JSON header becomes 64 MiB of blanks, a 64 kB zlib stream
    sections[0] = zlib.compress(b" " * (64 << 20), 9)


def _graph_bomb() -> bytes:
    """The graph section replaced by a zstd frame that unpacks to 128 MiB of zeros."""
    parts = unpack_sections(onnxc_writer.encode_model(_pruned())[_START:])
    size, chunk = 128 << 20, bytes(1 << 20)
    packer = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj(size=size)
    parts[0] = b"".join([*(packer.compress(chunk) for _ in range(size >> 20)), packer.flush()])
    return _frame(parts)


CRAFTED = {
    "all-zero tensor of 67M elements": lambda: _sparse_tensor(0, [_HUGE]),
    "67M equal values": lambda: _sparse_tensor(_HUGE, [_HUGE]),
    "dims whose product wraps int64": lambda: _sparse_tensor(0, [1 << 40, 1 << 40]),
    "SuRP stream of 67M steps": lambda: _surp_payload(_many_steps),
    "SuRP header unpacking to 64 MiB": lambda: _surp_payload(_huge_header),
    "graph unpacking to 128 MiB": _graph_bomb,
}


# ---------------------------------------------------------------- bounds


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_counts_are_refused_fast_and_small(case, version):
    data = CRAFTED[case]() if version == 2 else _as_format_1(CRAFTED[case]())
    assert len(data) < 200_000  # a small file claiming far more than it can hold
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(OnnxcError, match="corrupted .onnxc file"):
            onnxc_reader.decode_model(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5.0
    assert peak < 32 << 20, f"{case}: {peak / 2**20:.0f} MiB"


def test_cli_refuses_a_crafted_file_in_one_line(tmp_path, capsys):
    source = tmp_path / "crafted.onnxc"
    source.write_bytes(CRAFTED["all-zero tensor of 67M elements"]())
    start = time.perf_counter()
    assert main(["decode", str(source), "-o", str(tmp_path / "out.onnx")]) == 2
    assert time.perf_counter() - start < 5.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {source}: corrupted"), err
    assert "more than this reader decodes from a file of this size" in err[0]
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("which", ["prune", "rdprune"])
def test_writer_pads_a_file_that_decodes_more_than_its_size_allows(which, monkeypatch):
    model, coded = (_pruned(), []) if which == "prune" else _rdpruned()
    unpadded = onnxc_writer.encode_model(model, coded)
    monkeypatch.setattr(onnxc, "DECODE_FLOOR", 0)
    monkeypatch.setattr(onnxc, "VALUES_PER_BYTE", 1)  # far below what these files decode
    padded = onnxc_writer.encode_model(model, coded)
    assert len(padded) > len(unpadded)
    assert onnxc_reader.decode_model(padded) == model  # within the reader's bound: padded enough
    parts = unpack_sections(padded[_START:])
    assert len(parts[2]) > 0 and not any(parts[2])  # zeros
    parts[2] = parts[2][: len(parts[2]) // 2]  # less padding: over the reader's bound
    with pytest.raises(OnnxcError, match="more than this reader decodes from a file of this size"):
        onnxc_reader.decode_model(_frame(parts))


# ---------------------------------------------------------------- per-block checks


def _edited_files(data: bytes, per_block: int):
    """(block index, file) with one payload byte flipped and the whole-file CRC redone."""
    parts = unpack_sections(data[_START:])
    for index in range(_FIRST_BLOCK, len(parts)):
        codec, payload, check = unpack_sections(parts[index])
        for at in np.linspace(0, len(payload) - 1, per_block).astype(int).tolist():
            edited = bytearray(payload)
            edited[at] ^= 0x10
            yield index, bytes(edited), codec, check, parts


@pytest.mark.parametrize("which", ["prune", "rdprune"])
def test_every_edited_block_is_rejected(which):
    model, coded = (_pruned(), []) if which == "prune" else _rdpruned()
    data = onnxc_writer.encode_model(model, coded)
    edits = 0
    for index, payload, codec, check, parts in _edited_files(data, per_block=8):
        edited = [*parts[:index], pack_sections([codec, payload, check]), *parts[index + 1 :]]
        with pytest.raises(OnnxcError, match="checksum does not match"):
            onnxc_reader.decode_model(_frame(edited))
        edits += 1
    assert edits >= 8 * (2 if which == "prune" else 1)


@pytest.mark.parametrize("which", ["prune", "rdprune"])
def test_edits_behind_a_redone_block_crc_are_caught_by_the_weights_digest(which):
    """An editor who also redoes the block's CRC: the digest of the decoded weights is left,
    so every edit is refused or, where the codec ignores the edited bits, decodes exactly."""
    model, coded = (_pruned(), []) if which == "prune" else _rdpruned()
    data = onnxc_writer.encode_model(model, coded)
    refused = same = 0
    for index, payload, codec, check, parts in _edited_files(data, per_block=6):
        edited = [*parts[:index], _block(codec, payload, check[4:]), *parts[index + 1 :]]
        try:
            decoded = onnxc_reader.decode_model(_frame(edited))
        except OnnxcError:
            refused += 1
            continue
        assert decoded == model  # never other weights
        same += 1
    assert refused > 0 and refused + same >= 6


def test_format_1_files_are_still_read():
    model, coded = _rdpruned()  # sparse and SuRP blocks
    assert onnxc_reader.decode_model(_as_format_1(onnxc_writer.encode_model(model, coded))) == model


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_random_edits_with_redone_crc_never_decode_to_other_weights(data):
    """Fuzz: a few bytes anywhere in the body changed, the whole-file CRC redone: one clean
    refusal, or (an edit the format ignores, e.g. in the padding) exactly the original."""
    model = _pruned()
    body = bytearray(_pruned_file()[_START:])
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    edited = onnxc.MAGIC + struct.pack("<BQI", 2, len(body), zlib.crc32(body)) + bytes(body)
    try:
        decoded = onnxc_reader.decode_model(edited)
    except OnnxcError:
        return
    assert decoded == model


@functools.cache
def _pruned_file() -> bytes:
    return onnxc_writer.encode_model(_pruned())
