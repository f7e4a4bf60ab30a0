"""Rank choice (alignment, retained energy, EVBMF, a spread-out grid) and the MAC cost of each
factorized form.

Costs are multiply-accumulates per output pixel of a 2-D conv **at stride 1**: every factor
then runs at the output resolution. With stride s, the leading 1×1 of Tucker-2/CP/BTD runs at
the input resolution (s² more pixels) and so does the part of a separable form before the
factor that carries the stride; callers with strided convs correct for it.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.optimize

# EVBMF threshold constant τ̄ = 2.5129·√α (Nakajima et al., JMLR 2013, Thm. 2 and below): the
# root of the equation that separates a signal singular value from noise.
_EVBMF_TAU_FACTOR = 2.5129


def align_rank(rank: int, align: int = 16, maximum: int | None = None) -> int:
    """Round `rank` up to a multiple of `align` (at least `align`), then cap it at `maximum`.

    Aligned widths run faster on vector units. The cap wins: the result may be unaligned when
    `maximum` is not a multiple of `align`, and is `maximum` itself when `maximum < align`.
    """
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if maximum is not None and maximum < 1:
        raise ValueError(f"maximum must be >= 1, got {maximum}")
    aligned = max(align, math.ceil(rank / align) * align)
    return aligned if maximum is None else min(aligned, maximum)


def layer_align(align: int, width: int) -> int:
    """The alignment a layer of rank `width` at most can use: `align` halved until it is
    below `width`, so that a 16-wide layer with align 16 still has a rank (8) under its full
    width instead of none (wide layers keep `align` as it is)."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    while align > 1 and align >= width:
        align //= 2
    return align


def aligned_ranks(align: int, maximum: int, include_maximum: bool = False) -> list[int]:
    """The ranks a budget may choose from: multiples of the layer's alignment below `maximum`
    (and `maximum` itself when asked)."""
    step = layer_align(align, maximum)
    stop = maximum + step if include_maximum else maximum
    return sorted({align_rank(r, step, maximum) for r in range(step, stop, step)})


def spread(values: list[int], count: int) -> list[int]:
    """At most `count` of the sorted `values`, evenly spread, first and last included: the
    grid a search tries when every value would cost too much."""
    if len(values) <= count:
        return list(values)
    picks = np.linspace(0, len(values) - 1, count).round().astype(int)
    return [values[i] for i in sorted(set(picks))]


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r whose top-r singular values keep at least `energy` of Σσ² (0 < energy ≤ 1).

    Returns 0 only when every singular value is 0. A relative slack of 1e-12 keeps rounding in
    the cumulative sum from asking for directions that carry no energy at all.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sigma = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)).ravel())[::-1]
    cumulative = np.cumsum(sigma**2)
    if cumulative.size == 0 or cumulative[-1] == 0.0:
        return 0
    needed = energy * cumulative[-1] * (1.0 - 1e-12)
    return int(np.searchsorted(cumulative, needed, side="left")) + 1


def vbmf_rank(matrix: np.ndarray) -> int:
    """Rank estimated by empirical variational Bayesian matrix factorization (EVBMF).

    Nakajima, Tomioka, Sugiyama, Babacan, "Global analytic solution of fully-observed
    variational Bayesian matrix factorization", JMLR 14 (2013). With the noise variance σ²
    unknown, σ² minimises the free energy (a 1-D problem once the SVD is known); the rank is
    the number of singular values above the EVBMF threshold √(Mσ²(1+τ̄)(1+α/τ̄)).
    Used on the mode-0/mode-1 unfoldings of conv weights by Kim et al. (ICLR 2016).
    """
    y = np.asarray(matrix, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {y.shape}")
    if y.shape[0] > y.shape[1]:
        y = y.T  # the analysis assumes L ≤ M
    rows, cols = y.shape
    sigma = scipy.linalg.svdvals(y)
    if sigma.size == 0 or sigma[0] == 0.0:
        return 0
    alpha = rows / cols
    tau_bar = _EVBMF_TAU_FACTOR * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    noise = _evbmf_noise_variance(sigma, rows, cols, alpha, x_bar)
    threshold = math.sqrt(cols * noise * x_bar)
    return int(np.sum(sigma > threshold))


def _evbmf_noise_variance(
    sigma: np.ndarray, rows: int, cols: int, alpha: float, x_bar: float
) -> float:
    """σ² minimising the EVBMF free energy, searched on log σ² within the paper's bounds."""
    # The rank can be at most ⌈L/(1+α)⌉ − 1, so the singular values beyond it bound σ² below;
    # the mean square of all entries bounds it above.
    max_rank = min(math.ceil(rows / (1 + alpha)) - 1, sigma.size)
    tail = sigma[max_rank:] if max_rank < sigma.size else sigma[-1:]
    upper = float(np.sum(sigma**2) / (rows * cols))
    lower = max(tail[0] ** 2 / (cols * x_bar), float(np.mean(tail**2)) / cols)
    lower = min(max(lower, upper * 1e-12), upper)  # exact low-rank input: tail is 0

    def free_energy(log_noise: float) -> float:
        # Σ_h ψ(x_h) with ψ0(x) = x − ln x for noise and ψ0 + ψ1 for signal (paper, Thm. 2),
        # x = σ_h²/(Mσ²). The constant −ln σ_h² is dropped from each term so that exactly-zero
        # singular values do not produce log(0).
        x = sigma**2 / (cols * math.exp(log_noise))
        signal = x[x > x_bar]
        shifted = signal - (1 + alpha)
        tau = 0.5 * (shifted + np.sqrt(np.maximum(shifted**2 - 4 * alpha, 0.0)))
        psi1 = np.log(tau + 1) + alpha * np.log(tau / alpha + 1) - tau
        return float(np.sum(x) + x.size * (math.log(cols) + log_noise) + np.sum(psi1))

    if lower >= upper:
        return upper
    result = scipy.optimize.minimize_scalar(
        free_energy, bounds=(math.log(lower), math.log(upper)), method="bounded"
    )
    return math.exp(result.x)


def conv_macs_per_pixel(n: int, c: int, kh: int, kw: int, groups: int = 1) -> int:
    """A Conv with weight [n, c/groups, kh, kw]."""
    return n * (c // groups) * kh * kw


def fga_macs_per_pixel(n: int, c: int, kh: int, kw: int, groups: int, rank: int) -> int:
    """Grouped kh×kw conv (c → g·r, group=g) then 1×1 (g·r → n)."""
    return rank * c * kh * kw + n * groups * rank


def fga_btd_macs_per_pixel(
    n: int, c: int, kh: int, kw: int, groups: int, rank: int, inner_channels: int
) -> int:
    """1×1 (c → g·c′), grouped kh×kw (g·c′ → g·r, group=g), 1×1 (g·r → n)."""
    inner = groups * inner_channels
    return inner * c + groups * rank * inner_channels * kh * kw + n * groups * rank


def tucker2_macs_per_pixel(n: int, c: int, kh: int, kw: int, r_in: int, r_out: int) -> int:
    """1×1 (c → r_in), kh×kw core (r_in → r_out), 1×1 (r_out → n)."""
    return r_in * c + r_out * r_in * kh * kw + n * r_out


def cp_macs_per_pixel(n: int, c: int, kh: int, kw: int, rank: int) -> int:
    """1×1 (c → R), depthwise kh×1, depthwise 1×kw, 1×1 (R → n)."""
    return rank * (c + kh + kw + n)


def spatial_svd_macs_per_pixel(n: int, c: int, kh: int, kw: int, rank: int) -> int:
    """kh×1 conv (c → rank) then 1×kw conv (rank → n)."""
    return rank * c * kh + n * rank * kw


spatial_svd_macs = spatial_svd_macs_per_pixel  # the shorter name the task brief used


def matrix_macs_per_row(m: int, n: int, rank: int | None = None) -> int:
    """x (1×m) @ W (m×n) per row of x; with `rank`, through the two factors (m×r)(r×n)."""
    return m * n if rank is None else rank * (m + n)
