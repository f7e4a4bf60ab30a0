"""Factorized replacements for Conv/Gemm/MatMul weights: pure numpy/tensorly maths, no ONNX.

Conv weights follow ONNX: W[n, c, kh, kw] (n outputs, c inputs) of a 2-D conv with group=1;
1-D/3-D convs and grouped convs are not handled here. Each `*_factors` function returns the
weights of the replacement convs in execution order, and each `compose_*` rebuilds the
equivalent full weight (for tests and error measurement). The arithmetic is float64; results
come back in the input's floating dtype (float32 for non-float input). Rank choice and MAC
costs live in `maths.ranks`, the calibration refit in `maths.least_squares` and the block-term
FGA in `maths.btd`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import tensorly as tl
from tensorly.decomposition import partial_tucker

from onnxcompress.maths import cp_als
from onnxcompress.maths.least_squares import (  # noqa: F401  (re-exported)
    LeastSquaresAccumulator,
    refit_least_squares,
)
from onnxcompress.maths.ranks import (  # noqa: F401  (re-exported)
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

log = logging.getLogger(__name__)


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """‖W − Ŵ‖ / ‖W‖ (Frobenius), in float64."""
    w = np.asarray(weight, dtype=np.float64)
    return float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-30))


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
        # Without a contraction path numpy loops over all indices at once: minutes on 512².
        optimize=True,
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
    weight: np.ndarray,
    rank: int,
    seed: int = 0,
    n_iter_max: int = 300,
    tol: float = 1e-7,
    l2_reg: float = 0.0,
) -> CPFactors:
    """Rank-R CP of a 2-D conv weight [n, c, kh, kw] by ALS (`maths.cp_als`: tensorly's
    `parafac` algorithm without its Khatri–Rao products).

    ALS starts from an SVD initialisation (padded with seeded random columns when R exceeds a
    mode's size; a seeded random one where the SVD has too few vectors) and stops when the
    relative error changes by less than `tol` between sweeps; `converged` says whether that
    happened within `n_iter_max` sweeps. A sweep costs about 2·R·|W| MACs.

    `l2_reg` > 0 adds a ridge term of l2_reg·‖W‖²/R to every ALS solve. Unregularized CP
    often ends with large components that cancel each other; the fit is as good, but any
    rounding of the intermediate activations (int8, fp16) no longer cancels (see
    docs/decisions.md#cpoptionsl2_reg).
    """
    w = _conv_weight(weight)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    ridge = l2_reg * float(np.sum(w * w)) / rank
    try:
        start = cp_als.svd_start(w, rank, np.random.RandomState(seed))
    except (ValueError, np.linalg.LinAlgError) as error:
        log.debug("CP's SVD start failed (%s); using a random one", error)
        start = cp_als.random_start(w.shape, rank, seed)
    (out_f, in_f, vert_f, horiz_f), errors = cp_als.als(w, start, n_iter_max, tol, ridge)
    scale = np.ones(rank)
    for factor in (in_f, vert_f, horiz_f):
        norms = np.linalg.norm(factor, axis=0)
        norms[norms == 0] = 1.0
        factor /= norms
        scale = scale * norms
    out_f = out_f * scale
    # ALS breaks on |Δerror| < tol, so the last two recorded errors say whether it did.
    converged = bool(tol and len(errors) >= 2 and abs(errors[-2] - errors[-1]) < tol)
    kh, kw = w.shape[2:]
    dtype = _output_dtype(weight)
    first = in_f.T.reshape(rank, -1, 1, 1).astype(dtype)
    vertical = vert_f.T.reshape(rank, 1, kh, 1).astype(dtype)
    horizontal = horiz_f.T.reshape(rank, 1, 1, kw).astype(dtype)
    last = out_f.reshape(-1, rank, 1, 1).astype(dtype)
    # Measured on the returned factors, not ALS's running estimate, which loses accuracy
    # near zero (it is a square root of a difference of squares).
    residual = np.linalg.norm(w - compose_cp(first, vertical, horizontal, last))
    relative = float(residual / max(np.linalg.norm(w), np.finfo(float).tiny))
    return CPFactors(first, vertical, horizontal, last, converged, len(errors), relative)


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
        optimize=True,
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
