"""The `.onnxc` file's generic lossless "sparse" codec for float32/float16 tensors: positions of
the non-zero bit patterns by coded gaps, the values as a codebook or as coded sign/exponent +
raw mantissa. Decoding checks every count against the payload before allocating for it."""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxcompress.coding.entropy import (
    CodingError,
    charge,
    decode_categorical,
    decode_gaps,
    encode_categorical,
    encode_gaps,
    pack_ints,
    pack_sections,
    unpack_ints,
    unpack_sections,
)

# ONNX type -> (numpy type, bit-pattern type, mantissa bits). The sign and exponent bits of a
# value are entropy coded; its mantissa bits are stored raw.
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: (np.float32, np.uint32, 23),
    onnx.TensorProto.FLOAT16: (np.float16, np.uint16, 10),
}
MAX_CODEBOOK = 4096  # distinct values up to which a tensor's values are coded as a codebook
MAX_ELEMENTS = 1 << 40  # a tensor's element count beyond any model this tool can write

_VALUES_CODEBOOK, _VALUES_SPLIT = 0, 1
_CHUNK = 1 << 20  # values per chunk when packing mantissas bit by bit (bounds memory)


def encode_sparse(arrays: dict[str, np.ndarray]) -> bytes:
    """Lossless code of float32/float16 tensors: positions of the non-zero bit patterns by
    gaps, the values as indices into their distinct values (if few, <= 4096) or as coded
    sign/exponent + raw mantissa. Works on bit patterns, so -0.0 and NaNs survive exactly."""
    parts = []
    for name, array in arrays.items():
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)
        if onnx_type not in FLOAT_TYPES:
            raise ValueError(f"sparse codec takes float32/float16, got {np.asarray(array).dtype}")
        _, bit_type, mantissa = FLOAT_TYPES[onnx_type]
        bits = np.ascontiguousarray(array).reshape(-1).view(bit_type)
        positions = np.flatnonzero(bits)
        gaps = np.diff(positions, prepend=-1) - 1
        header = [onnx_type, array.ndim, *array.shape, positions.size]
        values = _encode_values(bits[positions].astype(np.uint64), 8 * bits.itemsize, mantissa)
        parts.append(pack_sections([name.encode(), pack_ints(header), encode_gaps(gaps), values]))
    return pack_sections(parts)


def sparse_charge(array: np.ndarray) -> int:
    """Values decode_sparse charges for `array`: its elements, a gap and a value per nonzero."""
    bits = np.ascontiguousarray(array).reshape(-1).view(f"u{np.asarray(array).itemsize}")
    return int(array.size + 2 * np.count_nonzero(bits))


def decode_sparse(payload: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_sparse`: {name: array} (float32 or float16)."""
    arrays = {}
    for part in unpack_sections(payload):
        sections = unpack_sections(part)
        if len(sections) != 4:
            raise CodingError("sparse tensor record is malformed")
        name = sections[0].decode()
        header = unpack_ints(sections[1])
        if len(header) < 3 or header[0] not in FLOAT_TYPES or len(header) != header[1] + 3:
            raise CodingError("sparse tensor header is malformed")
        dtype, bit_type, mantissa = FLOAT_TYPES[header[0]]
        shape, count = header[2:-1], header[-1]
        size = math.prod(shape)  # exact: a numpy product of crafted dims could wrap around
        if size > MAX_ELEMENTS or count > size:
            raise CodingError(f"{count} non-zeros in a tensor of {size} elements")
        charge(size, f"sparse tensor {name}")
        positions = _positions(sections[2], count, size)
        bits = np.zeros(size, dtype=bit_type)
        width = 8 * bits.itemsize
        bits[positions] = _decode_values(sections[3], count, width, mantissa).astype(bit_type)
        arrays[name] = bits.view(dtype).reshape(shape)
    return arrays


def _positions(data: bytes, count: int, size: int) -> np.ndarray:
    """The `count` non-zero positions from their coded gaps, checked to lie in the tensor."""
    positions = decode_gaps(data, count)
    if not count:
        return positions
    if positions.min() < 0 or positions.max() >= size:
        raise CodingError("non-zero position outside the tensor")
    positions += 1  # position = running sum of (gap + 1), minus 1; in place, no temporaries
    np.cumsum(positions, out=positions)
    positions -= 1
    # max, not the last: a sum that wrapped around passed the tensor's end first.
    if positions.max() >= size:
        raise CodingError("non-zero position outside the tensor")
    return positions


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
