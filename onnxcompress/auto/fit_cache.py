"""Results of slow deterministic fits (CP-ALS), kept across runs and processes.

`auto` fits the same layer at the same rank in its sensitivity runs (worker processes), in
every plan it builds, and again in the next run on the same model, and CP-ALS is slow (see
docs/decisions.md#cp-fit-cache). A fit is
keyed by everything its result depends on (the weight's bytes, the settings, the tensorly
version) and stored as an `.npz` of arrays (read without pickle) in the cache folder's
`fits/`, beside the latency cache. The cache is an optimisation: a store that cannot be read
or written is skipped and the fit is computed.
"""

from __future__ import annotations

import hashlib
import io as bytes_io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorly as tl

from onnxcompress.auto import latency_cache as latency_cache
from onnxcompress.errors import CompressError
from onnxcompress.io import write_bytes_atomic

log = logging.getLogger(__name__)

# Bump when a fit's maths changes, so old results are not read.
VERSION = 1
# Fits kept in memory per process (the disk keeps them all).
MEMORY_ENTRIES = 512

_memory: dict[str, dict[str, np.ndarray]] = {}


def cached_fit(
    kind: str, weight: np.ndarray, settings: dict, fit: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """`fit()` (named arrays), or what it returned before for the same kind, weight and
    settings (JSON-able values)."""
    key = fit_key(kind, weight, settings)
    found = _memory.get(key)
    if found is None:
        found = _read(key)
    if found is None:
        found = {name: np.asarray(value) for name, value in fit().items()}
        _write(key, found)
    if len(_memory) >= MEMORY_ENTRIES:
        _memory.pop(next(iter(_memory)))
    _memory[key] = found
    return {name: value.copy() for name, value in found.items()}  # callers may write to theirs


def fit_key(kind: str, weight: np.ndarray, settings: dict) -> str:
    digest = hashlib.sha256(f"{kind} v{VERSION} tensorly {tl.__version__}".encode())
    array = np.ascontiguousarray(weight)
    digest.update(
        json.dumps([str(array.dtype), list(array.shape), settings], sort_keys=True).encode()
    )
    digest.update(array.tobytes())
    return digest.hexdigest()


def _path(key: str) -> Path:
    return latency_cache.cache_folder() / "fits" / f"{key}.npz"


def _read(key: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(_path(key), allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.debug("fit cache entry %s not read: %s", key, exc)
        return None


def _write(key: str, arrays: dict[str, np.ndarray]) -> None:
    buffer = bytes_io.BytesIO()
    np.savez(buffer, **arrays)
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(buffer.getvalue(), path)
    except (OSError, CompressError) as exc:  # the cache is an optimisation, never a failure
        log.debug("fit cache not written: %s", exc)
