"""Framing of coded payloads: LEB128 varints, length-prefixed sections and a reader that
turns every overrun into a CodingError (bytes in, bytes out)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class CodingError(ValueError):
    """A payload that cannot be decoded: truncated, corrupted or inconsistent."""


def pack_sections(parts: list[bytes]) -> bytes:
    """Frame byte strings: count, each length, then the bytes (varints)."""
    out = bytearray()
    write_varint(out, len(parts))
    for part in parts:
        write_varint(out, len(part))
    for part in parts:
        out += part
    return bytes(out)


def unpack_sections(data: bytes) -> list[bytes]:
    """Inverse of `pack_sections`; raises CodingError on truncated or trailing data."""
    reader = Reader(data)
    count = reader.varint()
    if count > len(data):
        raise CodingError(f"section count {count} exceeds the payload size")
    lengths = [reader.varint() for _ in range(count)]
    parts = [reader.take(length) for length in lengths]
    if reader.remaining():
        raise CodingError(f"{reader.remaining()} stray bytes after the last section")
    return parts


def pack_ints(values: Iterable[int]) -> bytes:
    """Non-negative integers as LEB128 varints (small headers)."""
    out = bytearray()
    for value in values:
        write_varint(out, value)
    return bytes(out)


def unpack_ints(data: bytes) -> list[int]:
    """Inverse of `pack_ints`: every varint in `data`."""
    reader = Reader(data)
    values = []
    while reader.remaining():
        values.append(reader.varint())
    return values


def write_varint(out: bytearray, value: int) -> None:
    value = int(value)
    if value < 0:
        raise ValueError("varints are non-negative")
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return


def write_varints(out: bytearray, values: np.ndarray) -> None:
    for value in values.tolist():
        write_varint(out, value)


class Reader:
    """Sequential reads from a payload; every overrun is a CodingError."""

    def __init__(self, data: bytes):
        self.data = memoryview(bytes(data))
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        return self.take(1)[0]

    def take(self, length: int) -> bytes:
        if length > self.remaining():
            raise CodingError(f"truncated payload: needs {length} bytes, {self.remaining()} left")
        chunk = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        return chunk

    def rest(self) -> bytes:
        return self.take(self.remaining())

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= len(self.data):
                raise CodingError("truncated payload inside a varint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 70:
                raise CodingError("varint longer than 10 bytes")

    def varints(self, count: int) -> np.ndarray:
        if count > self.remaining():
            raise CodingError(f"truncated payload: {count} varints, {self.remaining()} bytes left")
        values = [self.varint() for _ in range(count)]
        if any(v >= 1 << 63 for v in values):
            raise CodingError("varint value too large")
        return np.array(values, dtype=np.int64)
