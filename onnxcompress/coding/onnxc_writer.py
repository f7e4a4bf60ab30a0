"""Writing the `.onnxc` file (layout in coding/onnxc.py): the graph stripped of its coded
weights and zstd'd, a checked block per coded tensor group (a pass's own, or `sparse`), and
padding when the file would decode more than its size allows; sizes for the report."""

from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import zstandard

from onnxcompress.coding.entropy import decode_budget, pack_sections
from onnxcompress.coding.onnxc import (
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    CodedWeights,
    as_graph_dtype,
    codec_decoder,
    graph_charge,
    padding_needed,
    weight_tensors,
    weights_digest,
)
from onnxcompress.coding.sparse_codec import FLOAT_TYPES, encode_sparse, sparse_charge
from onnxcompress.model_copies import stub_tensors

log = logging.getLogger(__name__)

MIN_CODED_ELEMENTS = 64
_GRAPH_ZSTD_LEVEL, _LARGE_GRAPH_ZSTD_LEVEL, _LARGE_GRAPH = 19, 9, 16 << 20


def encode_model(
    model: onnx.ModelProto, coded: Iterable[CodedWeights] = (), code_all: bool = False
) -> bytes:
    """The `.onnxc` bytes of `model`; `coded` blocks are used where they decode to the model's
    current weights bit for bit, every other worthwhile float32 weight is coded `sparse`
    (every one with `code_all`: a graph over protobuf's 2 GB limit cannot be written)."""
    return _frame(_encode_parts(model, list(coded), code_all))


def coded_size(model: onnx.ModelProto, coded: Iterable[CodedWeights] = ()) -> dict[str, int]:
    """Bytes the model takes as `.onnxc`: total, graph section, coded weights; tensor count."""
    parts = _encode_parts(model, list(coded))
    return {
        "total_bytes": len(_frame(parts)),
        "graph_bytes": len(parts.graph),
        "weight_bytes": sum(len(block) for block in parts.blocks),
        "coded_tensors": len(parts.blocks),
    }


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
        short = padding_needed(parts.charge, len(MAGIC) + HEADER.size + len(body))
        if short <= 0:
            return MAGIC + HEADER.pack(FORMAT_VERSION, len(body), zlib.crc32(body)) + body
        padding = bytes(len(padding) + short)


def _block(codec: str, payload: bytes, weights: dict[str, np.ndarray], typed: set[str]) -> bytes:
    """A coded block with its own check: a CRC of its bytes, a digest of what it decodes to."""
    crc = zlib.crc32(payload, zlib.crc32(codec.encode()))
    check = struct.pack("<I", crc) + weights_digest(weights, typed)
    return pack_sections([codec.encode(), payload, check])


def _encode_parts(
    model: onnx.ModelProto, coded: list[CodedWeights], code_all: bool = False
) -> _Parts:
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
        if len(payload) < array.nbytes or code_all:
            blocks.append(_block("sparse", payload, {name: array}, typed))
            done.add(name)
            charge += sparse_charge(array)
    # Coded initializers are left out as the copy is made (a whole copy would double memory).
    stripped = stub_tensors(model, {t.name: [] for t in model.graph.initializer if t.name in done})
    for name, tensor in weight_tensors(stripped).items():
        if name in done:  # Constant values, copied with their nodes
            for field in ("raw_data", "float_data", "int32_data"):
                tensor.ClearField(field)
    serial = stripped.SerializeToString()
    level = _GRAPH_ZSTD_LEVEL if len(serial) <= _LARGE_GRAPH else _LARGE_GRAPH_ZSTD_LEVEL
    # The frame's own checksum guards the graph (and the weights left in it).
    graph = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(serial)
    typed_names = pack_sections([n.encode() for n in tensors if n in typed and n in done])
    return _Parts(graph, typed_names, blocks, charge + graph_charge(len(serial)))


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
                decoded = codec_decoder(block.codec)(block.payload)
        except Exception as exc:  # a codec that cannot decode its own block: fall back
            decoded, why = {}, f"its payload does not decode ({type(exc).__name__}: {exc})"
        if not why and set(decoded) != set(names):
            why = "its payload decodes to other tensors than it names"
        for name in names if not why else []:
            current = onnx.numpy_helper.to_array(tensors[name])
            if not _bit_equal(as_graph_dtype(decoded[name], current.dtype), current):
                why = f"tensor {name} changed after the pass that coded it"
                break
    if why:
        log.warning(
            "not using the %s-coded block: %s; coding those tensors as sparse", block.codec, why
        )
    return None if why else budget.spent


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


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
