"""Whitening transforms of an input covariance: T with T Tᵀ = C (+ ridge), so that a layer fit
in the whitened inputs minimises its output error on the data."""

from __future__ import annotations

import numpy as np

# Ridge added to C, relative to its mean diagonal: keeps T invertible when channels are dead
# (always zero after a ReLU) or exactly correlated.
RIDGE = 1e-4


def whitening(moment: np.ndarray, diagonal: bool) -> np.ndarray:
    """T with T Tᵀ = C + ridge (lower triangular), or diag(√diag C) when `diagonal`."""
    c = len(moment)
    ridge = RIDGE * max(float(np.trace(moment)) / max(c, 1), 1e-30)
    if diagonal:
        return np.diag(np.sqrt(np.diag(moment) + ridge))
    return np.linalg.cholesky(moment + ridge * np.eye(c))
