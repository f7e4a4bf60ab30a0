"""Reading the `.onnxc` file (layout in coding/onnxc.py): the frame checked, every count charged
to the decode bound before it is allocated, each block checked and decoded into the stripped
tensor it came from; any fault is an OnnxcError of one line."""

from __future__ import annotations

import logging
import math
import os
import struct
import zlib

import numpy as np
import onnx
import zstandard

from onnxcompress.coding.entropy import CodingError, charge, decode_budget, unpack_sections
from onnxcompress.coding.onnxc import (
    BLOCK_CHECK,
    HEADER,
    MAGIC,
    READABLE_VERSIONS,
    OnnxcError,
    as_graph_dtype,
    codec_decoder,
    decode_limit,
    graph_charge,
    weight_tensors,
    weights_digest,
)
from onnxcompress.coding.sparse_codec import FLOAT_TYPES
from onnxcompress.errors import first_line

log = logging.getLogger(__name__)


def decode_model(data: bytes) -> onnx.ModelProto:
    """The ONNX model stored in `.onnxc` bytes; OnnxcError with one line if it is not one.
    Every count in the file is charged to decode_limit(len(data)) before it is allocated."""
    version, body = _check_frame(data)
    with decode_budget(decode_limit(len(data))):
        try:
            model, typed, blocks = _read_body(version, body)
        except OnnxcError:
            raise
        except Exception as exc:
            raise OnnxcError(f"corrupted .onnxc file: {first_line(exc)}") from exc
        holes = {n: t for n, t in weight_tensors(model).items() if _is_stripped(t)}
        for block in blocks:
            _decode_block(block, version, holes, typed)
    if holes:
        raise OnnxcError(f"corrupted .onnxc file: no data for tensor {next(iter(holes))}")
    if version < 2:  # after decoding, so that a bad file still ends in one error line
        log.warning("a format-1 .onnxc file: its weight blocks carry no checks of their own")
    return model


def _read_body(version: int, body: bytes) -> tuple[onnx.ModelProto, set[str], list[list[bytes]]]:
    """The stripped graph, the typed-field names and the blocks' sections."""
    parts = unpack_sections(body)
    first_block = 3 if version >= 2 else 2  # version 2 has a padding section
    if len(parts) < first_block:
        raise CodingError("missing graph section")
    size = zstandard.frame_content_size(parts[0])
    if size < 0:
        raise CodingError("the graph section does not declare its size")
    if version >= 2 and not zstandard.get_frame_parameters(parts[0]).has_checksum:
        raise CodingError("the graph section carries no checksum")
    if version >= 2 and parts[2].count(0) != len(parts[2]):
        raise CodingError("the padding section is not all zeros")
    charge(graph_charge(size), "the graph section")
    serial = zstandard.ZstdDecompressor().decompress(parts[0], max_output_size=size)
    model = onnx.ModelProto.FromString(serial)
    typed = {name.decode() for name in unpack_sections(parts[1])}
    return model, typed, [unpack_sections(block) for block in parts[first_block:]]


def _decode_block(block: list[bytes], version: int, holes: dict, typed: set[str]) -> None:
    """Decode one block into its tensors in the graph; from version 2 its bytes are checked
    before decoding and the weights it decodes to after."""
    if len(block) != (3 if version >= 2 else 2) or (version >= 2 and len(block[2]) != BLOCK_CHECK):
        raise OnnxcError("corrupted .onnxc file: a weight block is malformed")
    codec = block[0].decode(errors="replace")
    check = block[2] if version >= 2 else None
    if check and struct.unpack("<I", check[:4])[0] != zlib.crc32(block[1], zlib.crc32(block[0])):
        raise OnnxcError(f"corrupted .onnxc file: the {codec} block's checksum does not match")
    try:
        arrays = codec_decoder(codec)(block[1])
    except OnnxcError:
        raise
    except Exception as exc:
        raise OnnxcError(f"corrupted .onnxc file: {codec} block: {first_line(exc)}") from exc
    fitted = {name: _fitted(holes.get(name), name, array) for name, array in arrays.items()}
    if check and weights_digest(fitted, typed) != check[4:]:
        raise OnnxcError(
            f"corrupted .onnxc file: the {codec} block decodes to other weights than were written"
        )
    for name, array in fitted.items():
        _fill(holes.pop(name), array, name in typed)


def load_onnxc(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and decode a `.onnxc` file; errors name the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise OnnxcError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return decode_model(data)
    except OnnxcError as exc:
        raise OnnxcError(f"{path}: {exc}") from exc


def _check_frame(data: bytes) -> tuple[int, bytes]:
    if data[: len(MAGIC)] != MAGIC:
        raise OnnxcError("not an .onnxc file (wrong magic bytes)")
    start = len(MAGIC) + HEADER.size
    if len(data) < start:
        raise OnnxcError(f"truncated .onnxc file ({len(data)} bytes, header alone is {start})")
    version, length, crc = HEADER.unpack_from(data, len(MAGIC))
    if version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise OnnxcError(
            f"unsupported .onnxc format version {version} (this tool reads {readable})"
        )
    body = data[start:]
    if len(body) < length:
        raise OnnxcError(f"truncated .onnxc file ({len(data)} of {start + length} bytes)")
    if len(body) > length:
        raise OnnxcError(f"corrupted .onnxc file ({len(body) - length} stray bytes at the end)")
    if zlib.crc32(body) != crc:
        raise OnnxcError("checksum mismatch: the .onnxc file is corrupted")
    return version, body


def _is_stripped(tensor: onnx.TensorProto) -> bool:
    return (
        tensor.data_type in FLOAT_TYPES
        and math.prod(tensor.dims) > 0  # exact: numpy's product of crafted dims may wrap
        and not tensor.raw_data
        and not len(tensor.float_data)
        and not len(tensor.int32_data)
        and tensor.data_location != onnx.TensorProto.EXTERNAL
    )


def _fitted(tensor: onnx.TensorProto | None, name: str, array: np.ndarray) -> np.ndarray:
    """The decoded array in the stripped tensor's type, checked against its shape."""
    if tensor is None:
        raise OnnxcError(f"corrupted .onnxc file: coded tensor {name} has no place in the graph")
    dtype = FLOAT_TYPES[tensor.data_type][0]
    array = as_graph_dtype(array, dtype)
    if array.dtype != dtype or list(array.shape) != list(tensor.dims):
        raise OnnxcError(
            f"corrupted .onnxc file: tensor {name} decodes to {array.dtype}{list(array.shape)}, "
            f"the graph expects {np.dtype(dtype)}{list(tensor.dims)}"
        )
    return array


def _fill(tensor: onnx.TensorProto, array: np.ndarray, typed_field: bool) -> None:
    """Put decoded values into the stripped tensor: raw_data, or the typed field it came from
    (float_data for float32, int32_data holding float16 bit patterns)."""
    flat = array.reshape(-1)
    if not typed_field:
        tensor.raw_data = flat.astype(flat.dtype.newbyteorder("<")).tobytes()
    elif flat.dtype == np.float32:
        # float32 -> Python float -> float32 is exact, so the values come back bit for bit.
        tensor.float_data.extend(flat.tolist())
    else:
        tensor.int32_data.extend(flat.view(np.uint16).astype(np.int32).tolist())
