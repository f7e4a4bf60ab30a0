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

This module holds what the writer (onnxc_writer.py) and the reader (onnxc_reader.py) share:
the constants, the decode bound, the block digest and the codec table.
"""

from __future__ import annotations

import hashlib
import importlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.errors import CompressError, first_line

MAGIC = b"ONNXC"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no padding section, blocks without their own check
HEADER = struct.Struct("<BQI")  # version, body length, CRC32
BLOCK_CHECK = 12  # bytes: CRC32 of codec + payload, then an 8-byte digest of the weights
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


class OnnxcError(CompressError):
    """A `.onnxc` file that cannot be read; the message is one line."""


@dataclass(frozen=True)
class CodedWeights:
    """Weights a pass has already coded: `codec`'s decoder turns `payload` into `tensors`."""

    codec: str
    tensors: list[str]
    payload: bytes


def decode_limit(file_size: int) -> int:
    """Values a reader decodes at most from a file of `file_size` bytes (see VALUES_PER_BYTE)."""
    return max(DECODE_FLOOR, VALUES_PER_BYTE * file_size)


def padding_needed(charge: int, file_size: int) -> int:
    """Zero bytes a file of `file_size` bytes must add so that decoding `charge` values stays
    within decode_limit (0 when it already does)."""
    if charge <= decode_limit(file_size):
        return 0
    return -(-charge // VALUES_PER_BYTE) - file_size


def graph_charge(size: int) -> int:
    """Values charged for a graph section that unpacks to `size` bytes."""
    return -(-size // 4)


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


def weights_digest(weights: dict[str, np.ndarray], typed: set[str]) -> bytes:
    """8-byte BLAKE2b of the tensors' names, types, shapes, fields and little-endian values."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(weights):
        array = np.asarray(weights[name])
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        digest.update(f"{name}\0{array.dtype.str}{array.shape}{name in typed}\0".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.digest()


def as_graph_dtype(array: np.ndarray, dtype) -> np.ndarray:
    """A codec may decode float32 for a float16 tensor (SuRP works in float32): the graph's
    tensor holds the decoded values cast to its own float type, a deterministic step."""
    array = np.asarray(array)
    if array.dtype != dtype and array.dtype.kind == "f" and np.dtype(dtype).kind == "f":
        return array.astype(dtype)
    return array


def codec_decoder(codec: str) -> Callable[[bytes], dict[str, np.ndarray]]:
    """The function that decodes a `codec` payload into {tensor name: array}."""
    if codec not in CODECS:
        raise OnnxcError(f"unknown codec '{codec}' in .onnxc file (known: {', '.join(CODECS)})")
    module_name, _, function = CODECS[codec].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OnnxcError(f"codec '{codec}' is not available: {first_line(exc)}") from exc
    return getattr(module, function)
