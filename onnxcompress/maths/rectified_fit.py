"""Least-squares refit of a layer judged where its output is used: after a residual Add and a
Relu. With Z (samples × k) the layer's inputs, S (samples × n) what the Add adds to the
layer's output (zeros without an Add) and T the original model's values there, find P (n × k)
and b (n,) so that V = Z Pᵀ + b + S matches T. With `rectified` a Relu follows: where T ≤ 0
only what V lets through the Relu counts, max(V, 0)², so an entry where both are ≤ 0 costs
nothing; elsewhere (V − T)² (an upper bound of the Relu's error that keeps the fit smooth).

That loss is minimised by majorise–minimise: each step is an ordinary least-squares fit (with
the same ZᵀZ) to targets where T ≤ 0 is replaced by min(V, 0) of the current
fit; this bounds the loss from above and touches it at the current fit, so the loss never
rises from one step to the next.
"""

from __future__ import annotations

import numpy as np

from onnxcompress.maths.least_squares import solve_symmetric

# Majorise–minimise steps: each costs one more solve with the same matrix; not tuned
# (docs/decisions.md#channels-rectified-refit).
RECTIFIED_STEPS = 8


def downstream_error(
    inputs: np.ndarray,
    targets: np.ndarray,
    offset: np.ndarray,
    projection: np.ndarray,
    bias: np.ndarray,
    rectified: bool,
) -> float:
    """Σ (V − T)², or with `rectified` the loss of the module docstring, V = Z Pᵀ + b + S."""
    values = _predict(inputs, projection, bias) + offset
    if rectified:
        values = np.where(targets <= 0, np.maximum(values, 0.0), values)
        targets = np.where(targets <= 0, 0.0, targets)
    return float(np.sum(np.square(values - targets)))


def downstream_fit(
    inputs: np.ndarray,
    targets: np.ndarray,
    offset: np.ndarray,
    rectified: bool,
    steps: int = RECTIFIED_STEPS,
    ridge: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """P (n × k) and b (n,) minimising `downstream_error`; λ = ridge · trace(centred ZᵀZ)/k.

    Without `rectified` this is one least-squares fit of T − S; the offset lets the layer
    make up for errors that reach the Add by the other path."""
    t = np.asarray(targets, dtype=np.float64)
    s = np.asarray(offset, dtype=np.float64)
    mean_z = np.asarray(inputs, dtype=np.float64).mean(axis=0)
    centred = np.asarray(inputs, dtype=np.float64) - mean_z  # the one float64 copy of Z
    gram = centred.T @ centred
    scale = float(np.trace(gram)) / max(gram.shape[0], 1)
    gram += (ridge * scale if scale > 0 else ridge) * np.eye(gram.shape[0])

    def solve(goal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        projection = solve_symmetric(gram, centred.T @ goal).T
        return projection, goal.mean(axis=0) - projection @ mean_z

    projection, bias = solve(t - s)
    if not rectified:
        return projection, bias
    off = t <= 0
    for _ in range(steps):
        values = centred @ projection.T + (bias + projection @ mean_z) + s
        goal = np.where(off, np.minimum(values, 0.0), t) - s
        projection, bias = solve(goal)
    return projection, bias


def _predict(inputs: np.ndarray, projection: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.asarray(inputs, dtype=np.float64) @ np.asarray(projection, dtype=np.float64).T + bias
