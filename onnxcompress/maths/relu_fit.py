"""ReLU-aware least squares: fit ŷ = P x + b so that relu(ŷ) matches relu(y), for a layer whose
output goes through a ReLU (Zhang et al., "Accelerating very deep convolutional networks",
TPAMI 2016, the nonlinear response reconstruction; Ma et al. 2019's ReLU-aware objective).

A plain least-squares fit spends its rank on matching y where y < 0, which the ReLU discards.
Each iteration replaces a target that is negative by min(ŷ, 0) (where the fit is already
negative there is nothing to fix; where it is positive, pull it to 0) and solves least squares
again; the Gram matrix of the inputs does not change, so it is factorised once. An iteration
is kept only if the ReLU objective Σ‖relu(y) − relu(ŷ)‖² falls, so it never increases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

# Relative fall of the objective below which iterating stops.
TOLERANCE = 1e-4


@dataclass
class ReluFit:
    projection: np.ndarray  # n × k
    bias: np.ndarray  # n
    objectives: list[float] = field(default_factory=list)  # one per kept iterate, falling


def relu_objective(inputs, targets, projection, bias) -> float:
    """Σ‖relu(y) − relu(P x + b)‖² over the rows (inputs rows × k, targets rows × n)."""
    predicted = inputs @ projection.T + bias
    return float(np.sum((np.maximum(targets, 0) - np.maximum(predicted, 0)) ** 2))


def relu_aware_fit(
    inputs: np.ndarray,
    targets: np.ndarray,
    projection: np.ndarray,
    bias: np.ndarray,
    iterations: int = 10,
    ridge: float = 1e-6,
) -> ReluFit:
    """Refine (P, b) from the given start for the ReLU objective on these rows.

    ridge: λ relative to trace(centred XᵀX)/k, as the plain refit's."""
    x = np.asarray(inputs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    mean_x = x.mean(axis=0)
    centred = x - mean_x
    gram = centred.T @ centred
    lam = ridge * max(float(np.trace(gram)) / len(gram), 1e-30)
    factor = scipy.linalg.cho_factor(gram + lam * np.eye(len(gram)))
    best = ReluFit(np.asarray(projection, np.float64), np.asarray(bias, np.float64).reshape(-1))
    best.objectives.append(relu_objective(x, y, best.projection, best.bias))
    for _ in range(iterations):
        predicted = x @ best.projection.T + best.bias
        relaxed = np.where(y > 0, y, np.minimum(predicted, 0))
        mean_t = relaxed.mean(axis=0)
        new_projection = scipy.linalg.cho_solve(factor, centred.T @ (relaxed - mean_t)).T
        new_bias = mean_t - new_projection @ mean_x
        objective = relu_objective(x, y, new_projection, new_bias)
        if objective >= best.objectives[-1] * (1 - TOLERANCE):
            break
        best.projection, best.bias = new_projection, new_bias
        best.objectives.append(objective)
    return best
