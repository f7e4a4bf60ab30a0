"""The `.onnxc` compressed model file: the ONNX graph (zstd) plus entropy-coded weight blocks.

Layout (format version 2, integers little endian):
    b"ONNXC" | version u8 | body length u64 | CRC32 of body u32 | body
    body = pack_sections([graph, typed names, padding, block, block, ...])
    graph = zstd with its checksum(ModelProto with the coded tensors' data removed; dims and
        type kept)
    typed names = pack_sections(names of coded tensors stored in a typed field, not raw_data)
    padding = zero bytes, usually none (see VALUES_PER_BYTE)
    block = pack_sections([codec name, payload, check]); the payload names its own tensors;
        check = CRC32 of codec name + payload (u32), then BLAKE2b-64 of the decoded tensors
        (names, types, shapes, fields, values), so an edited block is refused, never decoded
        to other weights.
Format 1 (still read) has no padding section, no block checks and no graph checksum.
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
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import zstandard

from onnxcompress.coding.entropy import (
    CodingError,
    charge,
    decode_budget,
    pack_sections,
    unpack_sections,
)
from onnxcompress.coding.sparse_codec import FLOAT_TYPES, encode_sparse, sparse_charge
from onnxcompress.coding.sparse_codec import decode_sparse as decode_sparse
from onnxcompress.errors import CompressError, first_line

log = logging.getLogger(__name__)

MAGIC = b"ONNXC"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no padding section, blocks without their own check
_HEADER = struct.Struct("<BQI")  # version, body length, CRC32
_BLOCK_CHECK = 12  # bytes: CRC32 of codec + payload, then an 8-byte digest of the weights
# A file may make its reader decode at most VALUES_PER_BYTE values (symbols, tensor elements,
# graph bytes / 4) per byte of itself, and DECODE_FLOOR whatever its size: a crafted count
# fails before it is allocated. The writer pads the rare file that codes more than that.
VALUES_PER_BYTE = 64
DECODE_FLOOR = 1 << 24
# Codec name -> "module:function" decoding a payload into {tensor name: array}.
# Looked up lazily so the core never imports pass modules or optional codecs up front.
CODECS = {
    "sparse": "onnxcompress.coding.sparse_codec:decode_sparse",
    "surp": "onnxcompress.coding.surp:decode_payload",
}
MIN_CODED_ELEMENTS = 64
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
    return _frame(_encode_parts(model, list(coded)))


def coded_size(model: onnx.ModelProto, coded: Iterable[CodedWeights] = ()) -> dict[str, int]:
    """Bytes the model takes as `.onnxc`: total, graph section, coded weights; tensor count."""
    parts = _encode_parts(model, list(coded))
    return {
        "total_bytes": len(_frame(parts)),
        "graph_bytes": len(parts.graph),
        "weight_bytes": sum(len(block) for block in parts.blocks),
        "coded_tensors": len(parts.blocks),
    }


def decode_limit(file_size: int) -> int:
    """Values a reader decodes at most from a file of `file_size` bytes (see VALUES_PER_BYTE)."""
    return max(DECODE_FLOOR, VALUES_PER_BYTE * file_size)


@dataclass
class _Parts:
    graph: bytes
    typed: bytes  # names of coded tensors held in a typed field
    blocks: list[bytes]
    charge: int  # values a reader decodes (what it charges to its decode_limit)


def _frame(parts: _Parts) -> bytes:
    """Header and body; padded when the file would be too small for what it decodes."""
    padding = b""
    while True:
        body = pack_sections([parts.graph, parts.typed, padding, *parts.blocks])
        short = -(-parts.charge // VALUES_PER_BYTE) - len(MAGIC) - _HEADER.size - len(body)
        if parts.charge <= DECODE_FLOOR or short <= 0:
            return MAGIC + _HEADER.pack(FORMAT_VERSION, len(body), zlib.crc32(body)) + body
        padding = bytes(len(padding) + short)


def _block(codec: str, payload: bytes, weights: dict[str, np.ndarray], typed: set[str]) -> bytes:
    """A coded block with its own check: a CRC of its bytes, a digest of what it decodes to."""
    crc = zlib.crc32(payload, zlib.crc32(codec.encode()))
    check = struct.pack("<I", crc) + _digest(weights, typed)
    return pack_sections([codec.encode(), payload, check])


def _digest(weights: dict[str, np.ndarray], typed: set[str]) -> bytes:
    """8-byte BLAKE2b of the tensors' names, types, shapes, fields and little-endian values."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(weights):
        array = np.asarray(weights[name])
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        digest.update(f"{name}\0{array.dtype.str}{array.shape}{name in typed}\0".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.digest()


def _encode_parts(model: onnx.ModelProto, coded: list[CodedWeights]) -> _Parts:
    tensors = weight_tensors(model)
    typed = {name for name, t in tensors.items() if len(t.float_data) or len(t.int32_data)}
    blocks: list[bytes] = []
    done: set[str] = set()
    charge = 0
    for block in coded:
        if (spent := _block_matches(block, tensors, done)) is not None:
            arrays = {n: onnx.numpy_helper.to_array(tensors[n]) for n in block.tensors}
            blocks.append(_block(block.codec, block.payload, arrays, typed))
            done.update(block.tensors)
            charge += spent
    for name, tensor in tensors.items():
        if name in done or tensor.data_type not in FLOAT_TYPES:
            continue
        array = onnx.numpy_helper.to_array(tensor)
        if array.size < MIN_CODED_ELEMENTS:
            continue
        payload = encode_sparse({name: array})
        if len(payload) < array.nbytes:
            blocks.append(_block("sparse", payload, {name: array}, typed))
            done.add(name)
            charge += sparse_charge(array)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for name, tensor in weight_tensors(stripped).items():
        if name in done:
            for field in ("raw_data", "float_data", "int32_data"):
                tensor.ClearField(field)
    serial = stripped.SerializeToString()
    level = _GRAPH_ZSTD_LEVEL if len(serial) <= _LARGE_GRAPH else _LARGE_GRAPH_ZSTD_LEVEL
    # The frame's own checksum guards the graph (and the weights left in it).
    graph = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(serial)
    typed_names = pack_sections([n.encode() for n in tensors if n in typed and n in done])
    return _Parts(graph, typed_names, blocks, charge + _graph_charge(len(serial)))


def _graph_charge(size: int) -> int:
    return -(-size // 4)


def _block_matches(block: CodedWeights, tensors: dict, done: set[str]) -> int | None:
    """Whether a pass's block still decodes to the model's weights (later passes may change
    them): the values its decoding charges, or None after logging why not (the writer then
    codes those tensors itself)."""
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
            with decode_budget(None) as budget:
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
    return None if why else budget.spent


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
    charge(_graph_charge(size), "the graph section")
    serial = zstandard.ZstdDecompressor().decompress(parts[0], max_output_size=size)
    model = onnx.ModelProto.FromString(serial)
    typed = {name.decode() for name in unpack_sections(parts[1])}
    return model, typed, [unpack_sections(block) for block in parts[first_block:]]


def _decode_block(block: list[bytes], version: int, holes: dict, typed: set[str]) -> None:
    """Decode one block into its tensors in the graph; from version 2 its bytes are checked
    before decoding and the weights it decodes to after."""
    if len(block) != (3 if version >= 2 else 2) or (version >= 2 and len(block[2]) != _BLOCK_CHECK):
        raise OnnxcError("corrupted .onnxc file: a weight block is malformed")
    codec = block[0].decode(errors="replace")
    check = block[2] if version >= 2 else None
    if check and struct.unpack("<I", check[:4])[0] != zlib.crc32(block[1], zlib.crc32(block[0])):
        raise OnnxcError(f"corrupted .onnxc file: the {codec} block's checksum does not match")
    try:
        arrays = _decoder(codec)(block[1])
    except OnnxcError:
        raise
    except Exception as exc:
        raise OnnxcError(f"corrupted .onnxc file: {codec} block: {first_line(exc)}") from exc
    fitted = {name: _fitted(holes.get(name), name, array) for name, array in arrays.items()}
    if check and _digest(fitted, typed) != check[4:]:
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
    start = len(MAGIC) + _HEADER.size
    if len(data) < start:
        raise OnnxcError(f"truncated .onnxc file ({len(data)} bytes, header alone is {start})")
    version, length, crc = _HEADER.unpack_from(data, len(MAGIC))
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
    array = _as_graph_dtype(array, dtype)
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


def _decoder(codec: str) -> Callable[[bytes], dict[str, np.ndarray]]:
    if codec not in CODECS:
        raise OnnxcError(f"unknown codec '{codec}' in .onnxc file (known: {', '.join(CODECS)})")
    module_name, _, function = CODECS[codec].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OnnxcError(f"codec '{codec}' is not available: {first_line(exc)}") from exc
    return getattr(module, function)


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
