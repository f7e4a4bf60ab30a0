"""CP alternating least squares for a conv weight W[n, c, kh, kw] ≈ Σ_r a_r ∘ b_r ∘ v_r ∘ h_r,
without Khatri–Rao products.

tensorly's `parafac` forms each mode's Khatri–Rao product (n·c·kw × R and the like) and
multiplies W's unfolding by it, four times a sweep: on SqueezeNet's layers that was 6 s a fit
and most of `auto`'s first run. Here W is contracted with one factor at a time, and each
contraction serves two modes (W ×₂v ×₃h gives the a and b updates, W ×₀a ×₁b the v and h
ones): two W-sized products a sweep, no temporary larger than (n + c)·kh·kw × R. The updates,
their order (a, b, v, h), the ridge and the stopping rule are tensorly's, so the factors are
the same up to rounding."""

from __future__ import annotations

import numpy as np
import scipy.linalg

Factors = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # a (n,R) b (c,R) v (kh,R) h (kw,R)


def svd_start(w: np.ndarray, rank: int, rng: np.random.RandomState) -> Factors:
    """tensorly's `init="svd"`: each mode's leading left singular vectors (the first mode's
    scaled by the singular values), padded with uniform random columns from `rng` where the
    mode has fewer than `rank` rows. Raises ValueError, as tensorly does, when a mode's
    unfolding has fewer than `rank` singular vectors and that many rows (callers then start
    from `random_start`)."""
    factors = []
    for mode in range(4):
        unfolded = np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)
        u, s, _ = np.linalg.svd(unfolded, full_matrices=False)
        u = u[:, :rank]
        if mode == 0:
            u = u * s[: u.shape[1]]
        if w.shape[mode] < rank:
            u = np.hstack([u, rng.random_sample((w.shape[mode], rank - w.shape[mode]))])
        if u.shape[1] != rank:
            raise ValueError(f"mode {mode} has {u.shape[1]} singular vectors, rank {rank}")
        factors.append(u)
    return tuple(factors)


def random_start(shape: tuple[int, ...], rank: int, seed: int) -> Factors:
    """tensorly's `init="random"`: uniform factors from a fresh RandomState(seed)."""
    rng = np.random.RandomState(seed)
    return tuple(rng.random_sample((size, rank)) for size in shape)


def als(
    w: np.ndarray,
    start: Factors,
    sweeps: int,
    tol: float = 0.0,
    ridge: float = 0.0,
) -> tuple[Factors, list[float]]:
    """Up to `sweeps` ALS sweeps from `start` (only b, v, h are read: each sweep solves a
    first); stops after a sweep whose relative error moved by less than `tol` (0: never).
    `ridge` is added to every normal equation's diagonal. Returns the factors and the relative
    error after each sweep."""
    n, c, kh, kw = w.shape
    rank = start[0].shape[1]
    b, v, h = start[1:]
    by_out = w.transpose(0, 2, 3, 1).reshape(n * kh * kw, c)  # rows (n, i, j)
    by_in = w.transpose(1, 2, 3, 0).reshape(c * kh * kw, n)  # rows (c, i, j)
    norm_sq = float(np.sum(w * w)) or 1.0
    errors: list[float] = []
    for _ in range(max(1, sweeps)):
        spatial = (v[:, None, :] * h[None, :, :]).reshape(kh * kw, rank)
        gram_vh = (v.T @ v) * (h.T @ h)
        with_b = (by_out @ b).reshape(n, kh * kw, rank)
        a = _solve(gram_vh * (b.T @ b), np.einsum("nsr,sr->nr", with_b, spatial), ridge)
        with_a = (by_in @ a).reshape(c, kh * kw, rank)
        b = _solve(gram_vh * (a.T @ a), np.einsum("csr,sr->cr", with_a, spatial), ridge)
        rest = np.einsum("csr,cr->sr", with_a, b).reshape(kh, kw, rank)  # W ×₀ a ×₁ b
        gram_ab = (a.T @ a) * (b.T @ b)
        v = _solve(gram_ab * (h.T @ h), np.einsum("ijr,jr->ir", rest, h), ridge)
        mttkrp_h = np.einsum("ijr,ir->jr", rest, v)
        gram = gram_ab * (v.T @ v)
        h = _solve(gram, mttkrp_h, ridge)
        # ‖W − Ŵ‖² = ‖W‖² − 2⟨W, Ŵ⟩ + ‖Ŵ‖², all from quantities at hand.
        residual = norm_sq - 2 * np.sum(mttkrp_h * h) + np.sum(gram * (h.T @ h))
        errors.append(float(np.sqrt(abs(residual) / norm_sq)))
        if tol and len(errors) >= 2 and abs(errors[-2] - errors[-1]) < tol:
            break
    return (a, b, v, h), errors


def _solve(gram: np.ndarray, mttkrp: np.ndarray, ridge: float) -> np.ndarray:
    """The factor F with F · (gram + ridge·I) = mttkrp; a tiny extra ridge keeps Gram matrices
    of ranks above a mode's size solvable."""
    tiny = 1e-12 * max(float(np.trace(gram)) / len(gram), 1e-30)
    regular = gram + (ridge + tiny) * np.eye(len(gram))
    try:
        return scipy.linalg.solve(regular, mttkrp.T, assume_a="pos").T
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):  # not numerically positive
        return scipy.linalg.solve(regular, mttkrp.T).T
