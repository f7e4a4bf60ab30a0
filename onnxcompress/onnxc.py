"""The `.onnxc` compressed model file: the ONNX graph (zstd) plus entropy-coded weight blocks.

Layout (format version 1, integers little endian):
    b"ONNXC" | version u8 | body length u64 | CRC32 of body u32 | body
    body = pack_sections([graph, float_data names, block, block, ...])
    graph = zstd(ModelProto with the coded tensors' data removed; dims and type kept)
    typed names = pack_sections(names of coded tensors stored in a typed field, not raw_data)
    block = pack_sections([codec name, payload]); the payload names its own tensors.
Coded tensors are float32/float16 initializers or `Constant` node values (named by their
output).
Decoding restores every tensor bit for bit in the field it came from, so the decoded model
equals the encoded one.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import zstandard

from onnxcompress.entropy import (
    CodingError,
    decode_categorical,
    decode_gaps,
    encode_categorical,
    encode_gaps,
    pack_ints,
    pack_sections,
    unpack_ints,
    unpack_sections,
)
from onnxcompress.errors import CompressError, first_line

log = logging.getLogger(__name__)

MAGIC = b"ONNXC"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<BQI")  # version, body length, CRC32
# Codec name -> "module:function" decoding a payload into {tensor name: array}.
# Looked up lazily so the core never imports pass modules or optional codecs up front.
CODECS = {
    "sparse": "onnxcompress.onnxc:decode_sparse",
    "surp": "onnxcompress.surp:decode_payload",
}
MIN_CODED_ELEMENTS = 64
# ONNX type -> (numpy type, bit-pattern type, mantissa bits). The sign and exponent bits of a
# value are entropy coded; its mantissa bits are stored raw.
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: (np.float32, np.uint32, 23),
    onnx.TensorProto.FLOAT16: (np.float16, np.uint16, 10),
}
MAX_CODEBOOK = 4096  # distinct values up to which a tensor's values are coded as a codebook
_GRAPH_ZSTD_LEVEL, _LARGE_GRAPH_ZSTD_LEVEL, _LARGE_GRAPH = 19, 9, 16 << 20


class OnnxcError(CompressError):
    """A `.onnxc` file that cannot be read; the message is one line."""


@dataclass(frozen=True)
class CodedWeights:
    """Weights a pass has already coded: `codec`'s decoder turns `payload` into `tensors`."""

    codec: str
    tensors: list[str]
    payload: bytes


# -- writing -------------------------------------------------------------------------------


def encode_model(model: onnx.ModelProto, coded: Iterable[CodedWeights] = ()) -> bytes:
    """The `.onnxc` bytes of `model`; `coded` blocks are used where they decode to the model's
    current weights bit for bit, every other worthwhile float32 weight is coded `sparse`."""
    graph, float_data, blocks = _encode_parts(model, list(coded))
    return _frame(graph, float_data, blocks)


def coded_size(model: onnx.ModelProto, coded: Iterable[CodedWeights] = ()) -> dict[str, int]:
    """Bytes the model takes as `.onnxc`: total, graph section, coded weights; tensor count."""
    graph, float_data, blocks = _encode_parts(model, list(coded))
    return {
        "total_bytes": len(_frame(graph, float_data, blocks)),
        "graph_bytes": len(graph),
        "weight_bytes": sum(len(block) for block in blocks),
        "coded_tensors": len(blocks),
    }


def save_onnxc(
    model: onnx.ModelProto, path: str | os.PathLike, coded: Iterable[CodedWeights] = ()
) -> int:
    """Write the model as `.onnxc` atomically; returns the bytes written."""
    from onnxcompress import io

    return io.write_bytes_atomic(encode_model(model, coded), path)


def _frame(graph: bytes, float_data: bytes, blocks: list[bytes]) -> bytes:
    body = pack_sections([graph, float_data, *blocks])
    return MAGIC + _HEADER.pack(FORMAT_VERSION, len(body), zlib.crc32(body)) + body


def _encode_parts(
    model: onnx.ModelProto, coded: list[CodedWeights]
) -> tuple[bytes, bytes, list[bytes]]:
    tensors = weight_tensors(model)
    blocks: list[bytes] = []
    done: set[str] = set()
    for block in coded:
        if _block_matches(block, tensors, done):
            blocks.append(pack_sections([block.codec.encode(), block.payload]))
            done.update(block.tensors)
    for name, tensor in tensors.items():
        if name in done or tensor.data_type not in _FLOAT_TYPES:
            continue
        array = onnx.numpy_helper.to_array(tensor)
        if array.size < MIN_CODED_ELEMENTS:
            continue
        payload = encode_sparse({name: array})
        if len(payload) < array.nbytes:
            blocks.append(pack_sections([b"sparse", payload]))
            done.add(name)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    typed = []
    for name, tensor in weight_tensors(stripped).items():
        if name in done:
            if len(tensor.float_data) or len(tensor.int32_data):
                typed.append(name.encode())
            for field in ("raw_data", "float_data", "int32_data"):
                tensor.ClearField(field)
    serial = stripped.SerializeToString()
    level = _GRAPH_ZSTD_LEVEL if len(serial) <= _LARGE_GRAPH else _LARGE_GRAPH_ZSTD_LEVEL
    graph = zstandard.ZstdCompressor(level=level).compress(serial)
    return graph, pack_sections(typed), blocks


def _block_matches(block: CodedWeights, tensors: dict, done: set[str]) -> bool:
    """Whether a pass's block still decodes to the model's weights (later passes may change
    them); if not, log why, and the writer codes those tensors itself."""
    names = list(block.tensors)
    why = ""
    if not names:
        why = "it names no tensors"
    elif missing := [n for n in names if n not in tensors]:
        why = f"tensor {missing[0]} is no longer a weight of the model"
    elif taken := [n for n in names if n in done]:
        why = f"tensor {taken[0]} is already coded by another block"
    else:
        try:
            decoded = _decoder(block.codec)(block.payload)
        except Exception as exc:  # a codec that cannot decode its own block: fall back
            decoded, why = {}, f"its payload does not decode ({type(exc).__name__}: {exc})"
        if not why and set(decoded) != set(names):
            why = "its payload decodes to other tensors than it names"
        for name in names if not why else []:
            current = onnx.numpy_helper.to_array(tensors[name])
            if not _bit_equal(_as_graph_dtype(decoded[name], current.dtype), current):
                why = f"tensor {name} changed after the pass that coded it"
                break
    if why:
        log.warning(
            "not using the %s-coded block: %s; coding those tensors as sparse", block.codec, why
        )
    return not why


def _as_graph_dtype(array: np.ndarray, dtype) -> np.ndarray:
    """A codec may decode float32 for a float16 tensor (SuRP works in float32): the graph's
    tensor holds the decoded values cast to its own float type, a deterministic step."""
    array = np.asarray(array)
    if array.dtype != dtype and array.dtype.kind == "f" and np.dtype(dtype).kind == "f":
        return array.astype(dtype)
    return array


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def weight_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Top-level initializers and `Constant` node `value` tensors, by tensor name (the
    protos themselves, so callers may edit them in place)."""
    tensors = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    tensors[node.output[0]] = attr.t
    return tensors


# -- reading -------------------------------------------------------------------------------


def decode_model(data: bytes) -> onnx.ModelProto:
    """The ONNX model stored in `.onnxc` bytes; OnnxcError with one line if it is not one."""
    body = _check_frame(data)
    try:
        parts = unpack_sections(body)
        if len(parts) < 2:
            raise CodingError("missing graph section")
        serial = zstandard.ZstdDecompressor().decompress(parts[0])
        model = onnx.ModelProto.FromString(serial)
        typed = {name.decode() for name in unpack_sections(parts[1])}
        blocks = [unpack_sections(block) for block in parts[2:]]
    except OnnxcError:
        raise
    except Exception as exc:
        raise OnnxcError(f"corrupted .onnxc file: {first_line(exc)}") from exc
    holes = {name: tensor for name, tensor in weight_tensors(model).items() if _is_stripped(tensor)}
    for block in blocks:
        if len(block) != 2:
            raise OnnxcError("corrupted .onnxc file: a weight block is malformed")
        codec = block[0].decode(errors="replace")
        try:
            arrays = _decoder(codec)(block[1])
        except OnnxcError:
            raise
        except Exception as exc:
            raise OnnxcError(f"corrupted .onnxc file: {codec} block: {first_line(exc)}") from exc
        for name, array in arrays.items():
            _fill(holes.pop(name, None), name, array, name in typed)
    if holes:
        raise OnnxcError(f"corrupted .onnxc file: no data for tensor {next(iter(holes))}")
    return model


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


def _check_frame(data: bytes) -> bytes:
    if data[: len(MAGIC)] != MAGIC:
        raise OnnxcError("not an .onnxc file (wrong magic bytes)")
    start = len(MAGIC) + _HEADER.size
    if len(data) < start:
        raise OnnxcError(f"truncated .onnxc file ({len(data)} bytes, header alone is {start})")
    version, length, crc = _HEADER.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise OnnxcError(
            f"unsupported .onnxc format version {version} (this tool reads {FORMAT_VERSION})"
        )
    body = data[start:]
    if len(body) < length:
        raise OnnxcError(f"truncated .onnxc file ({len(data)} of {start + length} bytes)")
    if len(body) > length:
        raise OnnxcError(f"corrupted .onnxc file ({len(body) - length} stray bytes at the end)")
    if zlib.crc32(body) != crc:
        raise OnnxcError("checksum mismatch: the .onnxc file is corrupted")
    return body


def _is_stripped(tensor: onnx.TensorProto) -> bool:
    size = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return (
        tensor.data_type in _FLOAT_TYPES
        and size > 0
        and not tensor.raw_data
        and not len(tensor.float_data)
        and not len(tensor.int32_data)
        and tensor.data_location != onnx.TensorProto.EXTERNAL
    )


def _fill(tensor: onnx.TensorProto | None, name: str, array: np.ndarray, typed_field: bool):
    """Put decoded values into the stripped tensor: raw_data, or the typed field it came from
    (float_data for float32, int32_data holding float16 bit patterns)."""
    if tensor is None:
        raise OnnxcError(f"corrupted .onnxc file: coded tensor {name} has no place in the graph")
    dtype = _FLOAT_TYPES[tensor.data_type][0]
    array = _as_graph_dtype(array, dtype)
    if array.dtype != dtype or list(array.shape) != list(tensor.dims):
        raise OnnxcError(
            f"corrupted .onnxc file: tensor {name} decodes to {array.dtype}{list(array.shape)}, "
            f"the graph expects {np.dtype(dtype)}{list(tensor.dims)}"
        )
    flat = array.reshape(-1)
    if not typed_field:
        tensor.raw_data = flat.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    elif dtype == np.float32:
        # float32 -> Python float -> float32 is exact, so the values come back bit for bit.
        tensor.float_data.extend(flat.tolist())
    else:
        tensor.int32_data.extend(flat.view(np.uint16).astype(np.int32).tolist())


def _decoder(codec: str) -> Callable[[bytes], dict[str, np.ndarray]]:
    if codec not in CODECS:
        raise OnnxcError(f"unknown codec '{codec}' in .onnxc file (known: {', '.join(CODECS)})")
    module_name, _, function = CODECS[codec].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OnnxcError(f"codec '{codec}' is not available: {first_line(exc)}") from exc
    return getattr(module, function)


# -- the generic lossless "sparse" codec ----------------------------------------------------

_VALUES_CODEBOOK, _VALUES_SPLIT = 0, 1
_CHUNK = 1 << 20  # values per chunk when packing mantissas bit by bit (bounds memory)


def encode_sparse(arrays: dict[str, np.ndarray]) -> bytes:
    """Lossless code of float32/float16 tensors: positions of the non-zero bit patterns by
    gaps, the values as indices into their distinct values (if few, <= 4096) or as coded
    sign/exponent + raw mantissa. Works on bit patterns, so -0.0 and NaNs survive exactly."""
    parts = []
    for name, array in arrays.items():
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)
        if onnx_type not in _FLOAT_TYPES:
            raise ValueError(f"sparse codec takes float32/float16, got {np.asarray(array).dtype}")
        _, bit_type, mantissa = _FLOAT_TYPES[onnx_type]
        bits = np.ascontiguousarray(array).reshape(-1).view(bit_type)
        positions = np.flatnonzero(bits)
        gaps = np.diff(positions, prepend=-1) - 1
        header = [onnx_type, array.ndim, *array.shape, positions.size]
        values = _encode_values(bits[positions].astype(np.uint64), 8 * bits.itemsize, mantissa)
        parts.append(pack_sections([name.encode(), pack_ints(header), encode_gaps(gaps), values]))
    return pack_sections(parts)


def decode_sparse(payload: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_sparse`: {name: array} (float32 or float16)."""
    arrays = {}
    for part in unpack_sections(payload):
        sections = unpack_sections(part)
        if len(sections) != 4:
            raise CodingError("sparse tensor record is malformed")
        name = sections[0].decode()
        header = unpack_ints(sections[1])
        if len(header) < 3 or header[0] not in _FLOAT_TYPES or len(header) != header[1] + 3:
            raise CodingError("sparse tensor header is malformed")
        dtype, bit_type, mantissa = _FLOAT_TYPES[header[0]]
        shape, count = header[2:-1], header[-1]
        size = int(np.prod(shape)) if shape else 1
        if count > size:
            raise CodingError(f"{count} non-zeros in a tensor of {size}")
        positions = np.cumsum(decode_gaps(sections[2], count) + 1) - 1
        if count and positions[-1] >= size:
            raise CodingError("non-zero position outside the tensor")
        bits = np.zeros(size, dtype=bit_type)
        width = 8 * bits.itemsize
        bits[positions] = _decode_values(sections[3], count, width, mantissa).astype(bit_type)
        arrays[name] = bits.view(dtype).reshape(shape)
    return arrays


def _encode_values(values: np.ndarray, width: int, mantissa: int) -> bytes:
    """The non-zero bit patterns: a codebook + indices, or coded sign/exponent + raw mantissa,
    whichever is smaller (a codebook only for up to MAX_CODEBOOK distinct values)."""
    high = (values >> np.uint64(mantissa)).astype(np.int64)
    split = bytes([_VALUES_SPLIT]) + pack_sections(
        [encode_categorical(high, 1 << (width - mantissa)), _pack_low_bits(values, mantissa)]
    )
    # Distinct values in a sample bound those in the whole from below: skip a hopeless sort.
    if np.unique(values[:: max(1, values.size // 20_000)]).size > MAX_CODEBOOK:
        return split
    distinct, indices = np.unique(values, return_inverse=True)
    if distinct.size > MAX_CODEBOOK:
        return split
    codebook = bytes([_VALUES_CODEBOOK]) + pack_sections(
        [_pack_low_bits(distinct, width), encode_categorical(indices, max(distinct.size, 1))]
    )
    return codebook if len(codebook) <= len(split) else split


def _decode_values(data: bytes, count: int, width: int, mantissa: int) -> np.ndarray:
    if not data:
        raise CodingError("empty value section")
    mode, sections = data[0], unpack_sections(data[1:])
    if len(sections) != 2:
        raise CodingError("value section is malformed")
    if mode == _VALUES_CODEBOOK:
        if (len(sections[0]) * 8) % width:
            raise CodingError("codebook is not a whole number of values")
        distinct = _unpack_low_bits(sections[0], len(sections[0]) * 8 // width, width)
        indices = decode_categorical(sections[1], count, max(distinct.size, 1))
        if count and indices.max() >= distinct.size:
            raise CodingError("codebook index out of range")
        return distinct[indices] if count else np.zeros(0, dtype=np.uint64)
    if mode == _VALUES_SPLIT:
        high = decode_categorical(sections[0], count, 1 << (width - mantissa)).astype(np.uint64)
        return (high << np.uint64(mantissa)) | _unpack_low_bits(sections[1], count, mantissa)
    raise CodingError(f"unknown value mode {mode}")


def _pack_low_bits(values: np.ndarray, bits: int) -> bytes:
    """The low `bits` bits of each value, most significant first, tightly packed."""
    out = []
    for start in range(0, values.size, _CHUNK):  # _CHUNK * bits is a whole number of bytes
        chunk = values[start : start + _CHUNK].astype(">u8").view(np.uint8).reshape(-1, 8)
        out.append(np.packbits(np.unpackbits(chunk, axis=1)[:, 64 - bits :]).tobytes())
    return b"".join(out)


def _unpack_low_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    if len(data) != (count * bits + 7) // 8:
        raise CodingError(f"bit section of {len(data)} bytes for {count} values of {bits} bits")
    values = np.zeros(count, dtype=np.uint64)
    step = _CHUNK * bits // 8
    for index, start in enumerate(range(0, count, _CHUNK)):
        size = min(_CHUNK, count - start)
        raw = np.frombuffer(data, np.uint8, offset=index * step, count=(size * bits + 7) // 8)
        full = np.zeros((size, 64), dtype=np.uint8)
        full[:, 64 - bits :] = np.unpackbits(raw)[: size * bits].reshape(size, bits)
        values[start : start + size] = np.packbits(full, axis=1).view(">u8").reshape(-1)
    return values


# -- reference sizes -----------------------------------------------------------------------

_REFERENCE_CACHE: dict[bytes, dict[str, int]] = {}


def reference_sizes(data: bytes) -> dict[str, int]:
    """Bytes of `data` as is, gzip (level 9) and zstd (level 19): what general-purpose
    compressors make of a plain `.onnx` file. Cached by content digest (zstd -19 is slow)."""
    key = hashlib.sha256(data).digest()
    if key not in _REFERENCE_CACHE:
        if len(_REFERENCE_CACHE) > 16:
            _REFERENCE_CACHE.clear()
        _REFERENCE_CACHE[key] = {
            "bytes": len(data),
            "gzip9": len(gzip.compress(data, compresslevel=9, mtime=0)),
            "zstd19": len(zstandard.ZstdCompressor(level=19).compress(data)),
        }
    return dict(_REFERENCE_CACHE[key])
