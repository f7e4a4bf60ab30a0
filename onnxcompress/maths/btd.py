"""Block-term filter group approximation: 1×1 channel mixing → grouped kh×kw conv → 1×1.

The generalisation of FGA in methods.md §1: the leading 1×1 learns the channel mixing instead
of using fixed contiguous groups. Pure numpy; shapes as in `onnxcompress.maths.factors`.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

# Package-internal helpers shared with the other factorizations.
from onnxcompress.maths.factors import _check_rank, _conv_weight, _output_dtype, _svd, compose_fga

log = logging.getLogger(__name__)

# ALS sweeps each start gets before only the best start is iterated further.
_PROBE_ITERATIONS = 10


def fga_btd_factors(
    weight: np.ndarray,
    groups: int,
    rank: int,
    inner_channels: int | None = None,
    seed: int = 0,
    iterations: int = 50,
    tol: float = 1e-6,
    random_starts: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-term FGA of a 2-D conv weight [n, c, kh, kw]: 1×1 → grouped kh×kw → 1×1.

    Returns leading (g·c′, c, 1, 1), grouped (g·r, c′, kh, kw) for a Conv with group=g, and
    pointwise (n, g·r, 1, 1); c′ = `inner_channels` (default c // g), with g·c′ ≤ c.

    Algorithm: the leading 1×1 is kept with orthonormal rows (a rotation of the input channels
    followed by a split into g groups of c′), which makes both alternating steps exact:
    given the mixing A, each group's core and pointwise are the rank-r SVD of the projected
    weight (FGA on the rotated channels); given those, the best orthonormal A is an orthogonal
    Procrustes solution. So the error never rises; a run stops after `iterations` sweeps or
    when the relative error falls by less than `tol` in one. General block-term
    decompositions allow any A; this variant gives up that freedom for exact steps.
    ALS can stop in a local minimum, so it starts from the top singular vectors of the mode-1
    unfolding (dealt round-robin to the groups), from contiguous channel groups (= plain FGA,
    so with c′ = c/g the result is never worse than `fga_factors`) and from `random_starts`
    rotations drawn with `seed`; each start gets a few sweeps, the best one runs on.
    The pointwise factor carries the scale, as in `fga_factors`.
    """
    w = _conv_weight(weight)
    n, c, kh, kw = w.shape
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    inner = c // groups if inner_channels is None else inner_channels
    if inner < 1 or groups * inner > c:
        raise ValueError(f"groups·inner_channels = {groups}·{inner} must be in [1, c={c}]")
    _check_rank(rank, min(n, inner * kh * kw))
    slices = w.reshape(n, c, kh * kw)
    # Every start gets a short probe; only the best one is iterated to the end.
    probe = min(iterations, _PROBE_ITERATIONS)
    fits = [
        _btd_alternate(slices, start, groups, rank, probe, tol)
        for start in _btd_starts(slices, groups, inner, seed, random_starts)
    ]
    error, mixing, pointwise, cores = min(fits, key=lambda fit: fit[0])
    if iterations > probe:
        error, mixing, pointwise, cores = _btd_alternate(
            slices, mixing, groups, rank, iterations - probe, tol
        )
    log.debug("fga_btd: relative error %.4g", error)
    pointwise, cores = _scale_into_pointwise(pointwise, cores)
    dtype = _output_dtype(weight)
    return (
        mixing.T.reshape(groups * inner, c, 1, 1).astype(dtype),
        cores.reshape(groups * rank, inner, kh, kw).astype(dtype),
        pointwise.reshape(n, groups * rank, 1, 1).astype(dtype),
    )


def _btd_starts(slices: np.ndarray, groups: int, inner: int, seed: int, random_starts: int):
    """Initial orthonormal mixings (c × g·c′, column g·c′ + j is channel j of group g)."""
    n, c, s = slices.shape
    width = groups * inner
    rng = np.random.default_rng(seed)
    u, _, _ = _svd(slices.transpose(1, 0, 2).reshape(c, n * s), width)
    if u.shape[1] < width:  # fewer than g·c′ singular vectors (n·kh·kw < g·c′): complete them
        u = np.linalg.qr(np.hstack([u, rng.standard_normal((c, width - u.shape[1]))]))[0]
    # Round-robin: group g gets singular vectors g, g + groups, ... so energy is spread evenly.
    yield u.reshape(c, inner, groups).transpose(0, 2, 1).reshape(c, width)
    per_group = c // groups
    channels = [g * per_group + j for g in range(groups) for j in range(inner)]
    yield np.eye(c)[:, channels]
    for _ in range(random_starts):
        yield np.linalg.qr(rng.standard_normal((c, width)))[0]


def _btd_alternate(
    slices: np.ndarray, mixing: np.ndarray, groups: int, rank: int, iterations: int, tol: float
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Alternate the exact (core, pointwise) and mixing steps; return (error, A, P, G)."""
    norm_sq = float(np.sum(slices**2)) or 1.0
    previous = np.inf
    for step in range(max(iterations, 1)):
        pointwise, cores, captured = _btd_fit_groups(slices, mixing, groups, rank)
        # A has orthonormal columns, so ‖W − model‖² = ‖W‖² − Σ captured σ².
        error = float(np.sqrt(max(norm_sq - captured, 0.0) / norm_sq))
        if previous - error < tol or step == iterations - 1:
            break
        previous = error
        mixing = _btd_procrustes(slices, pointwise, cores)
    return error, mixing, pointwise, cores


def _btd_fit_groups(
    slices: np.ndarray, mixing: np.ndarray, groups: int, rank: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Given A: per group, the best rank-r fit P_g G_g of W projected on its c′ mixed channels.

    Returns pointwise P (n, g, r), cores G (g, r, c′, s) and the energy Σ‖P_g G_g‖² captured.
    """
    n, c, s = slices.shape
    inner = mixing.shape[1] // groups
    projected = (slices.transpose(0, 2, 1).reshape(n * s, c) @ mixing).reshape(n, s, groups, inner)
    pointwise = np.empty((n, groups, rank))
    cores = np.empty((groups, rank, inner, s))
    captured = 0.0
    for g in range(groups):
        block = projected[:, :, g].transpose(0, 2, 1).reshape(n, inner * s)
        pointwise[:, g], core, energy = _best_rank_fit(block, rank)
        cores[g] = core.reshape(rank, inner, s)
        captured += energy
    return pointwise, cores, captured


def _best_rank_fit(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(left, right, energy): left @ right is the best rank-r approximation of `matrix`.

    Uses the eigenvectors of the smaller Gram matrix, several times cheaper than an SVD inside
    the ALS loop; squaring costs accuracy only below ~1e-8 relative, far under what ALS needs.
    """
    rows, cols = matrix.shape
    gram = matrix @ matrix.T if rows <= cols else matrix.T @ matrix
    size = gram.shape[0]
    values, vectors = scipy.linalg.eigh(gram, subset_by_index=[size - rank, size - 1])
    energy = float(np.sum(np.maximum(values, 0.0)))
    if rows <= cols:
        return vectors, vectors.T @ matrix, energy
    return matrix @ vectors, vectors.T, energy


def _scale_into_pointwise(
    pointwise: np.ndarray, cores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Re-balance each group so its cores are orthonormal rows and P_g holds the scale."""
    pointwise, cores = pointwise.copy(), cores.copy()
    groups, rank = cores.shape[:2]
    for g in range(groups):
        u, sigma, vt = scipy.linalg.svd(cores[g].reshape(rank, -1), full_matrices=False)
        pointwise[:, g] = pointwise[:, g] @ (u * sigma)
        cores[g] = vt.reshape(cores[g].shape)
    return pointwise, cores


def _btd_procrustes(slices: np.ndarray, pointwise: np.ndarray, cores: np.ndarray) -> np.ndarray:
    """The orthonormal A minimising ‖W₍₁₎ − A K‖ for fixed (P, G): U Vᵀ from SVD(W₍₁₎ Kᵀ)."""
    n, c, s = slices.shape
    groups, rank, inner, _ = cores.shape
    target = np.empty((c, groups, inner))
    for g in range(groups):
        block = (pointwise[:, g] @ cores[g].reshape(rank, -1)).reshape(n, inner, s)
        target[:, g] = np.tensordot(slices, block, axes=([0, 2], [0, 2]))
    u, _, vt = _svd(target.reshape(c, groups * inner), groups * inner)
    return u @ vt


def compose_fga_btd(
    leading: np.ndarray, grouped: np.ndarray, pointwise: np.ndarray, groups: int
) -> np.ndarray:
    """The full weight (n, c, kh, kw) of 1×1(pointwise) ∘ grouped(group=g) ∘ 1×1(leading)."""
    inner_weight = compose_fga(grouped, pointwise, groups)  # (n, g·c′, kh, kw)
    return np.einsum("nmij,mc->ncij", inner_weight, np.asarray(leading, np.float64)[:, :, 0, 0])
