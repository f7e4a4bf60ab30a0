"""Reduced-rank regression: both factors of a low-rank layer fitted to data.

A layer y = P x (P: n × k) replaced by two factors P ≈ last · first (n × r, r × k) is fitted to
the original layer's outputs Y from the inputs X̂ the compressed model feeds it (asymmetric
reconstruction, Zhang et al. CVPR 2015; the truncation in the data's norm is SVD-LLM's):

    min over rank-r P of  Σ‖y − P x̂ − b‖²  +  λ ‖P − P₀‖²

P₀ is the original weight: the penalty pulls directions the data does not excite back to it, so
a small calibration set cannot send them anywhere (λ → ∞ is the weight-space truncation of P₀,
λ → 0 the pure data fit). With centred sums G = Σ x̂ x̂ᵀ, H = Σ x̂ yᵀ and G + λI = L Lᵀ, the
objective is ‖Lᵀ Pᵀ − L⁻¹(H + λP₀ᵀ)‖² plus a constant, so the optimum is the rank-r SVD of
M = L⁻¹(H + λP₀ᵀ) mapped back through L⁻ᵀ (Eckart–Young in the whitened coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

# Floor on λ relative to trace(G)/k: keeps the Cholesky defined when inputs are dead or
# exactly dependent (channels that are always zero after a ReLU).
JITTER = 1e-9


def _svd(matrix: np.ndarray):
    """gesdd (fast); gesvd when it does not converge, as it can on ill-conditioned input."""
    try:
        return scipy.linalg.svd(matrix, full_matrices=False)
    except np.linalg.LinAlgError:
        return scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesvd")


@dataclass
class LowRankFit:
    """P ≈ last @ first; `dropped`: the objective the truncation added (Σ of the tail s²)."""

    first: np.ndarray  # r × k
    last: np.ndarray  # n × r
    dropped: float

    @property
    def product(self) -> np.ndarray:
        return self.last @ self.first


def reduced_rank_fit(
    gram: np.ndarray,
    cross: np.ndarray,
    rank: int,
    prior: np.ndarray | None = None,
    strength: float = 0.0,
) -> LowRankFit:
    """Both factors of the rank-`rank` P minimising Σ‖y − P x‖² + strength·‖P − prior‖².

    gram: Σ x xᵀ (k × k, centred); cross: Σ x yᵀ (k × n, centred); prior: n × k (zeros if None).
    strength is λ in the units of gram. The singular values are split as √s on each side, so
    both factors have the same scale.
    """
    g = np.asarray(gram, dtype=np.float64)
    h = np.asarray(cross, dtype=np.float64)
    k, n = h.shape
    if g.shape != (k, k):
        raise ValueError(f"gram {g.shape} does not match cross {h.shape}")
    if not 0 < rank <= min(k, n):
        raise ValueError(f"rank {rank} outside 1..{min(k, n)}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    lam = max(strength, JITTER * max(float(np.trace(g)) / k, 1e-30))
    target = h + lam * np.asarray(prior, dtype=np.float64).T if prior is not None else h
    lower = np.linalg.cholesky(g + lam * np.eye(k))
    whitened = scipy.linalg.solve_triangular(lower, target, lower=True)
    u, s, vt = _svd(whitened)
    root = np.sqrt(s[:rank])
    # first = √s Uᵣᵀ L⁻¹, i.e. the rows of L⁻ᵀ Uᵣ √s.
    first = scipy.linalg.solve_triangular(lower, u[:, :rank] * root, lower=True, trans="T").T
    last = vt[:rank].T * root
    return LowRankFit(first, last, float(np.sum(s[rank:] ** 2)))
