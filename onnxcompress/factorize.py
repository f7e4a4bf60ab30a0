"""Factorized replacements for Conv/Gemm/MatMul weights: pure numpy/tensorly maths, no ONNX.

Conv weights follow ONNX: W[n, c, kh, kw] (n outputs, c inputs) of a 2-D conv with group=1;
1-D/3-D convs and grouped convs are not handled here. Each `*_factors` function returns the
weights of the replacement convs in execution order, and each `compose_*` rebuilds the
equivalent full weight (for tests and error measurement). The arithmetic is float64; results
come back in the input's floating dtype (float32 for non-float input). Rank choice and MAC
costs live in `onnxcompress.ranks`, the calibration refit in `onnxcompress.refit`; both are
re-exported here so that passes have one module to import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import tensorly as tl
from tensorly.decomposition import parafac, partial_tucker

from onnxcompress.ranks import (  # noqa: F401  (re-exported)
    align_rank,
    conv_macs_per_pixel,
    cp_macs_per_pixel,
    fga_btd_macs_per_pixel,
    fga_macs_per_pixel,
    matrix_macs_per_row,
    rank_for_energy,
    spatial_svd_macs,
    spatial_svd_macs_per_pixel,
    tucker2_macs_per_pixel,
    vbmf_rank,
)
from onnxcompress.refit import LeastSquaresAccumulator, refit_least_squares  # noqa: F401

log = logging.getLogger(__name__)


def _output_dtype(array: np.ndarray) -> np.dtype:
    dtype = np.asarray(array).dtype
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)


def _conv_weight(weight: np.ndarray) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"expected a 2-D conv weight [n, c, kh, kw], got shape {w.shape}")
    return w


def _check_rank(rank: int, maximum: int, what: str = "rank") -> None:
    if not 1 <= rank <= maximum:
        raise ValueError(f"{what} must be in [1, {maximum}], got {rank}")


def _svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-`rank` singular triplets (u, s, vt) of a float64 matrix."""
    try:
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesdd")
    except np.linalg.LinAlgError:
        # gesdd (divide and conquer) occasionally fails to converge; gesvd is slower but sturdier.
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesvd")
    return u[:, :rank], s[:rank], vt[:rank]


def truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(left (m×r) = U·S, right (r×n) = Vᵀ): left @ right is the best rank-r approximation."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {m.shape}")
    _check_rank(rank, min(m.shape))
    u, s, vt = _svd(m, rank)
    dtype = _output_dtype(matrix)
    return (u * s).astype(dtype), vt.astype(dtype)


def matrix_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(a (m×r), b (r×n)) with a @ b the best rank-r approximation, for Gemm/MatMul weights.

    The singular values are split as √S on each side so both factors have the same scale,
    which keeps float16/float32 factors away from over- and underflow.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {m.shape}")
    _check_rank(rank, min(m.shape))
    u, s, vt = _svd(m, rank)
    root = np.sqrt(s)
    dtype = _output_dtype(matrix)
    return (u * root).astype(dtype), (root[:, None] * vt).astype(dtype)


def fga_factors(weight: np.ndarray, groups: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Filter group approximation (Peng et al., ECCV 2018) of a 2-D conv weight [n, c, kh, kw].

    Input channels are split into `groups` contiguous groups; group i's unfolded weight
    M_i (n × (c/g)·kh·kw) gets its rank-r SVD M_i ≈ P_i Q_i (optimal per group).
    Returns `grouped` (g·r, c/g, kh, kw) for a Conv with group=g (group i's filters are the
    rows of Q_i) and `pointwise` (n, g·r, 1, 1) = [P_1 … P_g] for the following 1×1 Conv,
    which carries the singular values (it is the factor a calibration refit replaces).
    """
    w = _conv_weight(weight)
    n, c, kh, kw = w.shape
    if groups < 1 or c % groups:
        raise ValueError(f"groups={groups} must divide the {c} input channels")
    per_group = c // groups
    _check_rank(rank, min(n, per_group * kh * kw))
    grouped = np.empty((groups, rank, per_group, kh, kw))
    pointwise = np.empty((n, groups, rank))
    for i in range(groups):
        block = w[:, i * per_group : (i + 1) * per_group].reshape(n, -1)
        u, s, vt = _svd(block, rank)
        grouped[i] = vt.reshape(rank, per_group, kh, kw)
        pointwise[:, i] = u * s
    dtype = _output_dtype(weight)
    return (
        grouped.reshape(groups * rank, per_group, kh, kw).astype(dtype),
        pointwise.reshape(n, groups * rank, 1, 1).astype(dtype),
    )


def compose_fga(grouped: np.ndarray, pointwise: np.ndarray, groups: int) -> np.ndarray:
    """The full weight (n, c, kh, kw) of 1×1(pointwise) ∘ grouped conv(grouped, group=g)."""
    total_rank, per_group, kh, kw = grouped.shape
    rank = total_rank // groups
    n = pointwise.shape[0]
    p = np.asarray(pointwise, dtype=np.float64).reshape(n, groups, rank)
    q = np.asarray(grouped, dtype=np.float64).reshape(groups, rank, per_group, kh, kw)
    return np.einsum("ngr,grcij->ngcij", p, q).reshape(n, groups * per_group, kh, kw)


def tucker2_factors(
    weight: np.ndarray, rank_in: int, rank_out: int, random_state: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of a 2-D conv weight [n, c, kh, kw] on its channel modes (tensorly HOOI).

    Returns first (rank_in, c, 1, 1), core (rank_out, rank_in, kh, kw) and last
    (n, rank_out, 1, 1): 1×1 → kh×kw core → 1×1. The SVD (HOSVD) initialisation makes it
    deterministic; `random_state` only matters if tensorly must pad a rank-deficient factor.
    """
    w = _conv_weight(weight)
    n, c, kh, kw = w.shape
    _check_rank(rank_in, c, "rank_in")
    _check_rank(rank_out, n, "rank_out")
    result = partial_tucker(
        tl.tensor(w), rank=[rank_out, rank_in], modes=[0, 1], init="svd", random_state=random_state
    )
    core, (out_factor, in_factor) = _unpack_partial_tucker(result)
    dtype = _output_dtype(weight)
    return (
        np.asarray(in_factor).T.reshape(rank_in, c, 1, 1).astype(dtype),
        np.asarray(core).astype(dtype),
        np.asarray(out_factor).reshape(n, rank_out, 1, 1).astype(dtype),
    )


def _unpack_partial_tucker(result) -> tuple[np.ndarray, list[np.ndarray]]:
    # tensorly >= 0.8 returns ((core, factors), errors); older releases returned (core, factors).
    head, tail = result
    if isinstance(head, np.ndarray):
        return head, list(tail)
    core, factors = head
    return core, list(factors)


def compose_tucker2(first: np.ndarray, core: np.ndarray, last: np.ndarray) -> np.ndarray:
    """The full weight (n, c, kh, kw) of 1×1(last) ∘ core ∘ 1×1(first)."""
    return np.einsum(
        "no,oiab,ic->ncab",
        np.asarray(last, dtype=np.float64)[:, :, 0, 0],
        np.asarray(core, dtype=np.float64),
        np.asarray(first, dtype=np.float64)[:, :, 0, 0],
    )


@dataclass(frozen=True)
class CPFactors:
    """CP factors of a conv weight as four convs: pointwise → depthwise kh×1 → 1×kw → pointwise.

    The depthwise convs have group=R. `first`, `vertical` and `horizontal` have unit-norm
    filters; all scale (the CP weights λ) sits in `last`.
    """

    first: np.ndarray  # (R, c, 1, 1)
    vertical: np.ndarray  # (R, 1, kh, 1)
    horizontal: np.ndarray  # (R, 1, 1, kw)
    last: np.ndarray  # (n, R, 1, 1)
    converged: bool  # ALS stopped on its tolerance, not on n_iter_max
    iterations: int
    relative_error: float  # ‖W − W_cp‖ / ‖W‖


def cp_factors(
    weight: np.ndarray, rank: int, seed: int = 0, n_iter_max: int = 500, tol: float = 1e-8
) -> CPFactors:
    """Rank-R CP of a 2-D conv weight [n, c, kh, kw] by tensorly's ALS (`parafac`).

    ALS starts from an SVD initialisation (tensorly pads it with seeded random columns when
    R exceeds a mode's size) and falls back to a seeded random one if that fails. ALS stops
    when the relative error changes by less than `tol` between sweeps; `converged` says
    whether that happened within `n_iter_max` sweeps.
    """
    w = _conv_weight(weight)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    options = dict(n_iter_max=n_iter_max, tol=tol, random_state=seed, return_errors=True)
    try:
        cp, errors = parafac(tl.tensor(w), rank, init="svd", **options)
    except (ValueError, np.linalg.LinAlgError) as error:
        log.debug("parafac SVD init failed (%s); using a random init", error)
        cp, errors = parafac(tl.tensor(w), rank, init="random", **options)
    weights, factors = cp
    out_f, in_f, vert_f, horiz_f = (np.asarray(f, dtype=np.float64) for f in factors)
    scale = np.ones(rank) if weights is None else np.asarray(weights, dtype=np.float64)
    for factor in (in_f, vert_f, horiz_f):
        norms = np.linalg.norm(factor, axis=0)
        norms[norms == 0] = 1.0
        factor /= norms
        scale = scale * norms
    out_f = out_f * scale
    # tensorly breaks on |Δerror| < tol, so the last two recorded errors say whether it did.
    converged = bool(tol) and len(errors) >= 2 and abs(errors[-2] - errors[-1]) < tol
    kh, kw = w.shape[2:]
    dtype = _output_dtype(weight)
    result = CPFactors(
        first=in_f.T.reshape(rank, -1, 1, 1).astype(dtype),
        vertical=vert_f.T.reshape(rank, 1, kh, 1).astype(dtype),
        horizontal=horiz_f.T.reshape(rank, 1, 1, kw).astype(dtype),
        last=out_f.reshape(-1, rank, 1, 1).astype(dtype),
        converged=converged,
        iterations=len(errors),
        relative_error=0.0,
    )
    approx = compose_cp(result.first, result.vertical, result.horizontal, result.last)
    relative = float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), np.finfo(float).tiny))
    return CPFactors(**{**result.__dict__, "relative_error": relative})


def compose_cp(
    first: np.ndarray, vertical: np.ndarray, horizontal: np.ndarray, last: np.ndarray
) -> np.ndarray:
    """The full weight (n, c, kh, kw) of pointwise → depthwise kh×1 → depthwise 1×kw → pointwise."""
    return np.einsum(
        "nr,rc,ri,rj->ncij",
        np.asarray(last, dtype=np.float64)[:, :, 0, 0],
        np.asarray(first, dtype=np.float64)[:, :, 0, 0],
        np.asarray(vertical, dtype=np.float64)[:, 0, :, 0],
        np.asarray(horizontal, dtype=np.float64)[:, 0, 0, :],
    )


def spatial_svd_factors(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Spatial SVD (Jaderberg et al., BMVC 2014, scheme 2) of a 2-D conv weight [n, c, kh, kw].

    W is unfolded to the (c·kh) × (n·kw) matrix M[(c,i), (n,j)] = W[n, c, i, j], whose rank-r
    SVD gives vertical (rank, c, kh, 1), a kh×1 conv c → rank, and horizontal
    (n, rank, 1, kw), a 1×kw conv rank → n that carries the singular values.
    """
    w = _conv_weight(weight)
    n, c, kh, kw = w.shape
    _check_rank(rank, min(c * kh, n * kw))
    unfolded = w.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)
    u, s, vt = _svd(unfolded, rank)
    vertical = u.T.reshape(rank, c, kh, 1)
    horizontal = (s[:, None] * vt).reshape(rank, n, kw).transpose(1, 0, 2)[:, :, None, :]
    dtype = _output_dtype(weight)
    return vertical.astype(dtype), horizontal.astype(dtype)


def compose_spatial_svd(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """The full weight (n, c, kh, kw) of conv(horizontal, 1×kw) ∘ conv(vertical, kh×1)."""
    return np.einsum(
        "nkj,kci->ncij",
        np.asarray(horizontal, dtype=np.float64)[:, :, 0, :],
        np.asarray(vertical, dtype=np.float64)[:, :, :, 0],
    )


def fga_btd_factors(
    weight: np.ndarray,
    groups: int,
    rank: int,
    inner_channels: int | None = None,
    seed: int = 0,
    iterations: int = 100,
    tol: float = 1e-7,
    random_starts: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-term FGA of a 2-D conv weight [n, c, kh, kw]: 1×1 → grouped kh×kw → 1×1.

    Returns leading (g·c′, c, 1, 1), grouped (g·r, c′, kh, kw) for a Conv with group=g, and
    pointwise (n, g·r, 1, 1); c′ = `inner_channels` (default c // g), with g·c′ ≤ c.

    Algorithm: the leading 1×1 is kept with orthonormal rows (a rotation of the input channels
    followed by a split into g groups of c′), which makes both alternating steps exact:
    given the mixing A, each group's core and pointwise are the rank-r SVD of the projected
    weight (FGA on the rotated channels); given those, the best orthonormal A is an orthogonal
    Procrustes solution. So the error never rises; iterations stop when it falls by less than
    `tol` (relative to ‖W‖). General block-term decompositions allow any A; this variant
    gives up that freedom for exact steps. ALS can stop in a local minimum, so it runs from
    the top singular vectors of the mode-1 unfolding (dealt round-robin to the groups), from
    contiguous channel groups (= plain FGA, so with c′ = c/g the result is never worse than
    `fga_factors`), and from `random_starts` seeded random rotations; the best fit is kept.
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
    best = None
    for mixing in _btd_starts(slices, groups, inner, seed, random_starts):
        fit = _btd_alternate(slices, mixing, groups, rank, iterations, tol)
        if best is None or fit[0] < best[0]:
            best = fit
    error, mixing, pointwise, cores = best
    log.debug("fga_btd: relative error %.4g", error)
    dtype = _output_dtype(weight)
    return (
        mixing.T.reshape(groups * inner, c, 1, 1).astype(dtype),
        cores.reshape(groups * rank, inner, kh, kw).astype(dtype),
        pointwise.reshape(n, groups * rank, 1, 1).astype(dtype),
    )


def _btd_starts(slices: np.ndarray, groups: int, inner: int, seed: int, random_starts: int):
    """Initial orthonormal mixings (c × g·c′, column g·c′ + j is channel j of group g)."""
    n, c, s = slices.shape
    u, _, _ = _svd(slices.transpose(1, 0, 2).reshape(c, n * s), groups * inner)
    # Round-robin: group g gets singular vectors g, g + groups, ... so energy is spread evenly.
    yield u.reshape(c, inner, groups).transpose(0, 2, 1).reshape(c, groups * inner)
    per_group = c // groups
    channels = [g * per_group + j for g in range(groups) for j in range(inner)]
    yield np.eye(c)[:, channels]
    rng = np.random.default_rng(seed)
    for _ in range(random_starts):
        yield np.linalg.qr(rng.standard_normal((c, groups * inner)))[0]


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
    """Given A: per group, the rank-r SVD of W projected on the group's c′ mixed channels.

    Returns pointwise P (n, g, r), cores G (g, r, c′, s) and the energy the fit captures.
    """
    n, c, s = slices.shape
    inner = mixing.shape[1] // groups
    projected = (slices.transpose(0, 2, 1).reshape(n * s, c) @ mixing).reshape(n, s, groups, inner)
    pointwise = np.empty((n, groups, rank))
    cores = np.empty((groups, rank, inner, s))
    captured = 0.0
    for g in range(groups):
        u, sigma, vt = _svd(projected[:, :, g].transpose(0, 2, 1).reshape(n, inner * s), rank)
        pointwise[:, g] = u * sigma
        cores[g] = vt.reshape(rank, inner, s)
        captured += float(np.sum(sigma**2))
    return pointwise, cores, captured


def _btd_procrustes(slices: np.ndarray, pointwise: np.ndarray, cores: np.ndarray) -> np.ndarray:
    """The orthonormal A minimising ‖W₍₁₎ − A K‖ for fixed (P, G): U Vᵀ from SVD(W₍₁₎ Kᵀ)."""
    n, c, s = slices.shape
    groups, rank, inner, _ = cores.shape
    target = np.empty((c, groups, inner))
    for g in range(groups):
        block = (pointwise[:, g] @ cores[g].reshape(rank, -1)).reshape(n, inner, s)
        target[:, g] = np.tensordot(slices, block, axes=([0, 2], [0, 2]))
    u, _, vt = scipy.linalg.svd(target.reshape(c, groups * inner), full_matrices=False)
    return u @ vt


def compose_fga_btd(
    leading: np.ndarray, grouped: np.ndarray, pointwise: np.ndarray, groups: int
) -> np.ndarray:
    """The full weight (n, c, kh, kw) of 1×1(pointwise) ∘ grouped(group=g) ∘ 1×1(leading)."""
    inner_weight = compose_fga(grouped, pointwise, groups)  # (n, g·c′, kh, kw)
    return np.einsum("nmij,mc->ncij", inner_weight, np.asarray(leading, np.float64)[:, :, 0, 0])
