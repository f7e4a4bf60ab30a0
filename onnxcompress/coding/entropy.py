"""Entropy coding of integer arrays: range coding (constriction) with static models whose exact
histograms travel in the payload. Pure functions over numpy arrays; deterministic.

Payload layouts (all integers in headers are LEB128 varints):
- categorical: mode byte; mode 0 = modelled: k present symbols (delta coded), their counts,
  then the range coder's 32-bit words (little endian); mode 1 = fixed-width raw bit fields
  (used when too many distinct symbols for a 24-bit-precision model).
- gaps: each g >= 0 as v = g + 1 = 1.tt xxxx (binary): a token (bit length and the two bits
  after the leading one) coded categorically, then the remaining low bits stored raw.
- bits: a categorical over {0, 1}.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import constriction
import numpy as np

from onnxcompress.coding.framing import (  # noqa: F401  (CodingError and framing re-exported)
    CodingError,
    Reader,
    pack_ints,
    pack_sections,
    unpack_ints,
    unpack_sections,
    write_varint,
    write_varints,
)

# constriction's submodules live in a compiled extension: reach them as attributes.
Categorical = constriction.stream.model.Categorical
RangeEncoder = constriction.stream.queue.RangeEncoder
RangeDecoder = constriction.stream.queue.RangeDecoder

# Above this many distinct symbols a static model's header and 24-bit precision stop paying off.
MAX_MODELLED_SYMBOLS = 1 << 16
# Gaps: mantissa bits after the leading one that are modelled (the rest are stored raw);
# see docs/decisions.md#mantissa_bits
MANTISSA_BITS = 2
_SMALL = 1 << (MANTISSA_BITS + 1)  # v below this is coded exactly by its token
_MAX_GAP = (1 << 62) - 1
_MODE_MODELLED, _MODE_RAW = 0, 1


# -- decode budget -------------------------------------------------------------------------


class DecodeBudget:
    """How many values (decoded symbols, tensor elements) decoders may still produce. Every
    count read from a payload is charged here before anything is allocated for it, so a
    crafted count fails fast instead of taking memory and time it could never justify."""

    def __init__(self, limit: int | None):
        self.limit = limit  # None: only count (the writer measures what a reader will charge)
        self.spent = 0

    def charge(self, count: int, what: str) -> None:
        count = int(count)
        if count < 0:
            raise CodingError(f"{what}: negative count {count}")
        if self.limit is not None and self.spent + count > self.limit:
            raise CodingError(
                f"{what} declares {count:,} values, more than this reader decodes from a file "
                f"of this size ({self.limit:,} in all): refused as a possible decompression "
                "bomb (a format-1 file of a very sparse model can also hit this: encode the "
                "model again)"
            )
        self.spent += count


_BUDGET: contextvars.ContextVar[DecodeBudget | None] = contextvars.ContextVar(
    "decode_budget", default=None
)


@contextmanager
def decode_budget(limit: int | None) -> Iterator[DecodeBudget]:
    """Decoders called inside charge their counts to one budget (see DecodeBudget)."""
    budget = DecodeBudget(limit)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def charge(count: int, what: str) -> None:
    """Charge `count` values to the active decode budget (no budget: nothing to check)."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(count, what)


# -- categorical ---------------------------------------------------------------------------


def encode_categorical(symbols: np.ndarray, alphabet: int) -> bytes:
    """Code symbols in [0, alphabet) with a static model of their own histogram."""
    symbols = _as_int_array(symbols)
    if alphabet < 1:
        raise ValueError(f"alphabet must be at least 1, got {alphabet}")
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError(f"symbols outside [0, {alphabet})")
    present, counts, ranks = _histogram(symbols, alphabet)
    if present.size > MAX_MODELLED_SYMBOLS:
        return bytes([_MODE_RAW]) + _pack_fixed_width(symbols, _width(alphabet - 1))
    header = bytearray([_MODE_MODELLED])
    write_varint(header, present.size)
    write_varints(header, np.diff(present, prepend=0))
    write_varints(header, counts)
    if present.size < 2:  # one symbol (or none): the header says everything
        return bytes(header)
    encoder = RangeEncoder()
    encoder.encode(ranks, _model(counts))
    words = encoder.get_compressed().astype("<u4")
    return bytes(header) + words.tobytes()


def decode_categorical(data: bytes, count: int, alphabet: int) -> np.ndarray:
    """Inverse of `encode_categorical`: `count` symbols as an int64 array."""
    charge(count, "a coded stream")
    reader = Reader(data)
    mode = reader.byte()
    if mode == _MODE_RAW:
        symbols = _unpack_fixed_width(reader.rest(), count, _width(alphabet - 1))
        if symbols.size and symbols.max() >= alphabet:
            raise CodingError("decoded symbol outside the alphabet")
        return symbols
    if mode != _MODE_MODELLED:
        raise CodingError(f"unknown categorical mode {mode}")
    k = reader.varint()
    if k > max(count, 0) or (count > 0 and k == 0):
        raise CodingError(f"{k} distinct symbols for {count} values")
    present = np.cumsum(reader.varints(k), dtype=np.int64)
    counts = reader.varints(k)
    if np.any(counts < 1) or np.any(np.diff(present) < 1):
        raise CodingError("symbol histogram is not strictly increasing with positive counts")
    # Summed as Python ints: int64 could wrap around and match a crafted count.
    if sum(counts.tolist()) != count or (k and present[-1] >= alphabet):
        raise CodingError("symbol histogram does not match the payload")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k == 1:
        reader.rest()
        return np.full(count, present[0], dtype=np.int64)
    words = reader.rest()
    if len(words) % 4:
        raise CodingError("range coder data is not a whole number of 32-bit words")
    try:
        decoder = RangeDecoder(np.frombuffer(words, dtype="<u4").astype(np.uint32))
        ranks = decoder.decode(_model(counts), count)
    except Exception as exc:  # constriction raises its own errors on bad streams
        raise CodingError(f"range decoder failed: {exc}") from exc
    if ranks.size and (ranks.min() < 0 or ranks.max() >= k):
        raise CodingError("range decoder produced symbols outside the model")
    return present[ranks]


def _histogram(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, ...]:
    """(present symbols ascending, their counts, each symbol's rank among the present)."""
    if alphabet <= 1 << 20:  # a dense count is faster than sorting
        counts = np.bincount(symbols, minlength=alphabet)
        present = np.flatnonzero(counts)
        rank_of = np.cumsum(counts > 0) - 1
        return present, counts[present], rank_of[symbols].astype(np.int32)
    present, ranks, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    return present, counts, ranks.reshape(-1).astype(np.int32)


def _model(counts: np.ndarray):
    # Exact integer counts -> float64 is exact below 2**53, so both sides build the same model.
    return Categorical(counts.astype(np.float64), perfect=False)


# -- gaps ----------------------------------------------------------------------------------


def encode_gaps(gaps: np.ndarray) -> bytes:
    """Code non-negative integers (up to 2**62) shaped like a geometric distribution."""
    gaps = _as_int_array(gaps)
    if gaps.size and (gaps.min() < 0 or gaps.max() > _MAX_GAP):
        raise ValueError(f"gaps must be in [0, {_MAX_GAP}]")
    values = gaps.astype(np.uint64) + np.uint64(1)
    tokens, raw_widths, raw_bits = _split_gaps(values)
    return pack_sections(
        [
            encode_categorical(tokens, _token_count()),
            _pack_variable_width(raw_bits, raw_widths),
        ]
    )


def decode_gaps(data: bytes, count: int) -> np.ndarray:
    """Inverse of `encode_gaps`: `count` gaps as an int64 array."""
    parts = unpack_sections(data)
    if len(parts) != 2:
        raise CodingError(f"gap payload has {len(parts)} sections, expected 2")
    tokens = decode_categorical(parts[0], count, _token_count())
    if not tokens.size or tokens.max() < _SMALL - 1:  # every gap coded exactly by its token
        _unpack_variable_width(parts[1], np.zeros(0, np.int64))  # raw section must be empty
        return tokens  # token = v - 1 = the gap, without the intermediates below
    lengths = np.where(tokens < _SMALL - 1, 0, (tokens - (_SMALL - 1)) // (1 << MANTISSA_BITS) + 1)
    raw_widths = lengths.astype(np.int64)
    raw_bits = _unpack_variable_width(parts[1], raw_widths)
    values = _join_gaps(tokens, raw_widths, raw_bits)
    return (values - np.uint64(1)).astype(np.int64)


def _token_count() -> int:
    # Tokens below _SMALL - 1 are v - 1 exactly; then 2**MANTISSA_BITS tokens per bit length.
    return _SMALL - 1 + (63 - MANTISSA_BITS) * (1 << MANTISSA_BITS)


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Bit length of each uint64 (exact, also above 2**53 where float log2 rounds)."""
    lengths = np.zeros(values.shape, dtype=np.int64)
    rest = values.copy()
    for step in (32, 16, 8, 4, 2, 1):
        big = rest >= (np.uint64(1) << np.uint64(step))
        lengths[big] += step
        rest[big] >>= np.uint64(step)
    return lengths + (rest > 0)


def _split_gaps(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token, raw width, raw bits) of each v >= 1."""
    top = _bit_length(values) - 1  # position of the leading one
    raw_widths = np.maximum(top - MANTISSA_BITS, 0)
    mantissa = (values >> raw_widths.astype(np.uint64)) & np.uint64((1 << MANTISSA_BITS) - 1)
    tokens = np.where(
        values < _SMALL,
        values.astype(np.int64) - 1,
        _SMALL - 1 + (raw_widths - 1) * (1 << MANTISSA_BITS) + mantissa.astype(np.int64),
    )
    raw_bits = values & ((np.uint64(1) << raw_widths.astype(np.uint64)) - np.uint64(1))
    raw_bits[values < _SMALL] = 0
    return tokens, raw_widths, raw_bits


def _join_gaps(tokens: np.ndarray, raw_widths: np.ndarray, raw_bits: np.ndarray) -> np.ndarray:
    big = tokens >= _SMALL - 1
    mantissa = (tokens - (_SMALL - 1)) % (1 << MANTISSA_BITS)
    lead = ((1 << MANTISSA_BITS) | mantissa).astype(np.uint64)
    large = (lead << raw_widths.astype(np.uint64)) | raw_bits
    return np.where(big, large, (tokens + 1).astype(np.uint64))


# -- bits ----------------------------------------------------------------------------------


def encode_bits(bits: np.ndarray) -> bytes:
    """Code a 0/1 array with a static Bernoulli model (its count of ones in the header)."""
    bits = _as_int_array(bits)
    if bits.size and (bits.min() < 0 or bits.max() > 1):
        raise ValueError("bits must be 0 or 1")
    return encode_categorical(bits, 2)


def decode_bits(data: bytes, count: int) -> np.ndarray:
    """Inverse of `encode_bits`: `count` bits as a uint8 array."""
    return decode_categorical(data, count, 2).astype(np.uint8)


# -- helpers -------------------------------------------------------------------------------


def _as_int_array(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values).reshape(-1)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iub":
        raise ValueError(f"expected an integer array, got {array.dtype}")
    if array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:
        raise ValueError("values above 2**63 - 1")
    return array.astype(np.int64)


def _width(max_value: int) -> int:
    return max(int(max_value).bit_length(), 0)


def _pack_fixed_width(values: np.ndarray, width: int) -> bytes:
    widths = np.full(values.shape, width, dtype=np.int64)
    return _pack_variable_width(values.astype(np.uint64), widths)


def _unpack_fixed_width(data: bytes, count: int, width: int) -> np.ndarray:
    if len(data) != (count * width + 7) // 8:  # before allocating `count` widths
        raise CodingError(f"raw field section of {len(data)} bytes for {count} values")
    widths = np.full(count, width, dtype=np.int64)
    return _unpack_variable_width(data, widths).astype(np.int64)


def _pack_variable_width(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate each value's low `width` bits, most significant first."""
    total = int(widths.sum())
    if total == 0:
        return b""
    owner = np.repeat(np.arange(values.size), widths)
    starts = np.cumsum(widths) - widths
    shift = (widths[owner] - 1 - (np.arange(total) - starts[owner])).astype(np.uint64)
    bits = ((values[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits).tobytes()


def _unpack_variable_width(data: bytes, widths: np.ndarray) -> np.ndarray:
    total = int(widths.sum())
    if len(data) != (total + 7) // 8:
        raise CodingError(f"raw bit section of {len(data)} bytes, expected {(total + 7) // 8}")
    values = np.zeros(widths.size, dtype=np.uint64)
    if total == 0:
        return values
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:total].astype(np.uint64)
    owner = np.repeat(np.arange(widths.size), widths)
    starts = np.cumsum(widths) - widths
    shift = (widths[owner] - 1 - (np.arange(total) - starts[owner])).astype(np.uint64)
    # Bits of one value do not overlap, so summing the shifted bits ORs them together.
    np.add.at(values, owner, bits << shift)
    return values
