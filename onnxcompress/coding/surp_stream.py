"""The SuRP stream, everything its decoder needs, and its bytes: a versioned, checksummed
payload whose reader refuses a truncated, corrupted or oversized stream before allocating it.
The encoder and the decoder that replays the stream are in coding/surp.py."""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from onnxcompress.coding.entropy import (
    CodingError,
    charge,
    decode_bits,
    decode_gaps,
    encode_bits,
    encode_gaps,
    pack_sections,
    unpack_sections,
)
from onnxcompress.maths.successive_pruning import max_steps_for

VERSION = 1
_MAX_META = 1 << 22  # bytes of JSON header (names, shapes) a payload may unpack to
_MAX_WEIGHTS = 1 << 40  # pooled weights beyond any model this tool can write


@dataclass(frozen=True)
class SurpStream:
    """Everything the decoder needs. Steps pick pooled indices in a cyclic scan: step k picks
    (previous pick + gaps[k] + 1) mod n and adds τ_k = c / λ_k there; λ grows by `growth` after
    each step and is replaced by refresh_lambdas[j] before step refresh_steps[j]."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    scales: np.ndarray  # float32 per tensor: pooled value × scale = weight
    c: float  # ln(n/β): τ = c / λ
    growth: float  # n / (n − c)
    initial_lambda: float  # a float32 value, used in float64
    gaps: np.ndarray  # int64, one per step
    refresh_steps: np.ndarray  # int64, non-decreasing, each in [0, steps)
    refresh_lambdas: np.ndarray  # float32 values
    signs: np.ndarray  # uint8, 1 = negative; one per nonzero, in pooled (flat) order

    @property
    def size(self) -> int:
        return int(sum(math.prod(shape) for shape in self.shapes))

    @property
    def steps(self) -> int:
        return int(self.gaps.size)


def encode_payload(stream: SurpStream) -> bytes:
    """The stream as bytes: version, CRC-32, then sections (header, numbers, gaps, refresh
    positions, signs). Gaps and refresh positions are range-coded as near-geometric integers,
    signs as bits; names/shapes go in a zlib'd JSON header, float side info as raw float32."""
    meta = {
        "names": list(stream.names),
        "shapes": [list(shape) for shape in stream.shapes],
        "steps": stream.steps,
        "refreshes": int(stream.refresh_steps.size),
    }
    numbers = (
        struct.pack("<ddf", stream.c, stream.growth, stream.initial_lambda)
        + np.asarray(stream.scales, "<f4").tobytes()
        + np.asarray(stream.refresh_lambdas, "<f4").tobytes()
    )
    refresh_gaps = np.diff(stream.refresh_steps, prepend=-1) - 1
    body = pack_sections(
        [
            zlib.compress(json.dumps(meta, separators=(",", ":")).encode(), 9),
            numbers,
            encode_gaps(stream.gaps),
            encode_gaps(refresh_gaps),
            encode_bits(stream.signs),
        ]
    )
    return bytes([VERSION]) + struct.pack("<I", zlib.crc32(body)) + body


def parse_payload(payload: bytes) -> SurpStream:
    """The stream in `payload`; CodingError if it is truncated, corrupted or of another version."""
    if len(payload) < 5:
        raise CodingError(f"SuRP payload of {len(payload)} bytes is truncated")
    if payload[0] != VERSION:
        raise CodingError(f"SuRP payload version {payload[0]}; this decoder reads {VERSION}")
    body = payload[5:]
    if struct.unpack("<I", payload[1:5])[0] != zlib.crc32(body):
        raise CodingError("SuRP payload is corrupted (checksum mismatch)")
    try:
        sections = unpack_sections(body)
        if len(sections) != 5:
            raise CodingError(f"SuRP payload has {len(sections)} sections, expected 5")
        meta = json.loads(_inflate_meta(sections[0]))
        names = tuple(str(name) for name in meta["names"])
        shapes = tuple(tuple(int(d) for d in shape) for shape in meta["shapes"])
        steps, refreshes = int(meta["steps"]), int(meta["refreshes"])
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise CodingError(f"SuRP payload header is malformed: {exc}") from exc
    return _stream_from_sections(names, shapes, steps, refreshes, sections)


def _inflate_meta(data: bytes) -> bytes:
    """The zlib'd JSON header, refused if it would unpack beyond _MAX_META bytes."""
    inflater = zlib.decompressobj()
    meta = inflater.decompress(data, _MAX_META)
    if inflater.unconsumed_tail or not inflater.eof:
        raise CodingError(f"header is truncated or unpacks to more than {_MAX_META} bytes")
    return meta


def _stream_from_sections(names, shapes, steps, refreshes, sections) -> SurpStream:
    tensors = len(names)
    if len(shapes) != tensors or any(d < 0 for shape in shapes for d in shape) or steps < 0:
        raise CodingError("SuRP payload header is inconsistent")
    n = sum(math.prod(shape) for shape in shapes)  # exact, before anything is allocated
    if n > _MAX_WEIGHTS or steps > max_steps_for(n) or not 0 <= refreshes <= steps:
        raise CodingError(f"SuRP payload header declares {steps} steps over {n} weights")
    numbers = sections[1]
    if len(numbers) != 20 + 4 * (tensors + refreshes):
        raise CodingError("SuRP payload side information has the wrong length")
    # Weights, and steps at the four arrays a step takes beyond its gap (picks, λ, τ, sums).
    charge(n + 4 * steps, "SuRP payload")
    c, growth, lam0 = struct.unpack("<ddf", numbers[:20])
    floats = np.frombuffer(numbers[20:], "<f4").astype(np.float32)
    scales, refresh_lambdas = floats[:tensors], floats[tensors:]
    refresh_gaps = decode_gaps(sections[3], refreshes)
    if refreshes and (refresh_gaps.min() < 0 or refresh_gaps.max() >= steps):
        raise CodingError("SuRP payload refreshes λ after its last step")
    refresh_steps = np.cumsum(refresh_gaps + 1) - 1
    gaps = np.asarray(decode_gaps(sections[2], steps), np.int64)
    side = np.concatenate([[c, growth, lam0], scales, refresh_lambdas])
    if not (np.all(np.isfinite(side)) and np.all(side > 0)) or (steps and n == 0):
        raise CodingError("SuRP payload side information is not finite and positive")
    # The encoder's gaps are below n; larger ones could make the sums below wrap around.
    if steps and (gaps.min() < 0 or gaps.max() >= n):
        raise CodingError("SuRP payload has a step outside the weights")
    if refresh_steps.size and (refresh_steps.min() < 0 or refresh_steps.max() >= steps):
        raise CodingError("SuRP payload refreshes λ after its last step")
    chosen = np.zeros(n, bool)
    if steps:
        chosen[(np.cumsum(gaps + 1) - 1) % n] = True
    signs = np.asarray(decode_bits(sections[4], int(np.count_nonzero(chosen))), np.uint8)
    return SurpStream(
        names, shapes, scales, c, growth, lam0, gaps,
        refresh_steps.astype(np.int64), refresh_lambdas, signs,
    )  # fmt: skip
