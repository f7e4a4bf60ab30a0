"""Pruning maths shared by `prune`, `rdprune` and the benchmarks: magnitude masks (global or per
layer), N:M masks, and uniform quantisation of the surviving values. Pure numpy."""

from __future__ import annotations

import numpy as np

SCOPES = ("global", "layer")


def magnitude_masks(
    weights: dict[str, np.ndarray], sparsity: float, scope: str = "global"
) -> dict[str, np.ndarray]:
    """Boolean keep-masks (True = keep) that zero a `sparsity` fraction of the weights.

    `scope="layer"` prunes round(sparsity * size) of the smallest |w| in each tensor.
    `scope="global"` ranks every weight of every tensor together by |w| / rms(tensor) and
    prunes round(sparsity * total) of them. The RMS normalisation puts tensors of different
    scale on one footing (layers with a large fan-in have small weights and a raw global
    threshold would wipe them out), and unlike the L2 norm it does not depend on the tensor's
    size, so a big tensor's weights are not all made to look small. Ties are broken by
    position, so the pruned count is exact and the result deterministic.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope == "layer":
        return {name: _prune_smallest(np.abs(w), sparsity) for name, w in weights.items()}
    names = list(weights)
    scores = [_normalised_magnitude(weights[name]).reshape(-1) for name in names]
    flat = np.concatenate(scores) if scores else np.zeros(0)
    keep = _prune_smallest(flat, sparsity)
    masks, start = {}, 0
    for name, score in zip(names, scores, strict=True):
        masks[name] = keep[start : start + score.size].reshape(weights[name].shape)
        start += score.size
    return masks


def _normalised_magnitude(weight: np.ndarray) -> np.ndarray:
    magnitude = np.abs(weight.astype(np.float64))
    rms = np.sqrt(np.mean(magnitude**2)) if magnitude.size else 0.0
    return magnitude / rms if rms > 0 else magnitude


def _prune_smallest(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask pruning exactly round(sparsity * size) of the lowest scores."""
    count = int(round(sparsity * scores.size))
    keep = np.ones(scores.shape, dtype=bool)
    if count:
        order = np.argsort(scores.reshape(-1), kind="stable")
        keep.reshape(-1)[order[:count]] = False
    return keep


def nm_mask(weight: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep-mask with the `n` largest |w| of every `m` consecutive entries along `axis`.

    For 2:4 on a Conv weight [C_out, C_in, kh, kw] use axis=1 (the input channels): each
    group of 4 input channels at one (output, kernel position) keeps 2. The axis length must
    be a multiple of `m`. Ties keep the earlier entry.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M pattern needs 0 < N <= M, got {n}:{m}")
    weight = np.asarray(weight)
    axis = axis % weight.ndim
    if weight.shape[axis] % m:
        raise ValueError(f"axis of length {weight.shape[axis]} is not a multiple of {m}")
    moved = np.moveaxis(np.abs(weight), axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    # Stable sort of -|w|: the n largest come first, ties in position order.
    ranks = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1, kind="stable")
    keep = (ranks < n).reshape(moved.shape)
    return np.moveaxis(keep, -1, axis)


def quantize_uniform(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric uniform (mid-rise) quantisation of surviving weights to 2**bits levels.

    Returns (codes, codebook): `codebook[codes]` is the reconstruction (float32, same shape as
    `values`). Levels are (k + 1/2) * step for k in [-L/2, L/2) with step = max|v| / (L/2):
    symmetric, no level at zero, so a surviving weight is never turned into a pruned one
    (a zero input maps to the smallest positive level). Per tensor: call once per tensor.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    values = np.asarray(values, dtype=np.float64)
    levels = 1 << bits
    half = levels // 2
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    step = peak / half if peak > 0 else 1.0
    codebook = ((np.arange(levels) - half + 0.5) * step).astype(np.float32)
    codes = np.clip(np.floor(values / step) + half, 0, levels - 1).astype(np.int64)
    return codes, codebook
