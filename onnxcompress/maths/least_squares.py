"""Least-squares refit of a layer's last linear factor (and bias) on calibration activations.

With Z (samples × k) the inputs of the last factor and Y (samples × n) the original layer's
outputs, find P (n × k) and b (n,) minimising ‖Y − Z Pᵀ − 1 bᵀ‖² + λ‖P‖² (methods.md, top).
The sufficient statistics are accumulated batch by batch, so callers never hold every
activation at once.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import scipy.linalg


class LeastSquaresAccumulator:
    """Running sums for the ridge least-squares fit Y ≈ Z Pᵀ + b, fed in batches.

    Sums are kept about the first batch's means (a shifted-data scheme), so a large common
    offset in the activations does not cancel catastrophically when the sums are centred.
    """

    def __init__(self, k: int, n: int):
        self.k, self.n = k, n
        self.count = 0
        self._shift_z = np.zeros(k)
        self._shift_y = np.zeros(n)
        self._sum_z = np.zeros(k)
        self._sum_y = np.zeros(n)
        self._zz = np.zeros((k, k))
        self._zy = np.zeros((k, n))
        self._yy = 0.0
        self._dtype = np.dtype(np.float32)

    def add(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        """Accumulate one batch: inputs Z (samples × k), targets Y (samples × n)."""
        z = np.asarray(inputs, dtype=np.float64)
        y = np.asarray(targets, dtype=np.float64)
        if z.ndim != 2 or y.ndim != 2 or z.shape[1] != self.k or y.shape[1] != self.n:
            raise ValueError(
                f"expected inputs (samples, {self.k}) and targets (samples, {self.n}), "
                f"got {z.shape} and {y.shape}"
            )
        if z.shape[0] != y.shape[0]:
            raise ValueError(f"{z.shape[0]} input rows but {y.shape[0]} target rows")
        if z.shape[0] == 0:
            return
        if self.count == 0:
            self._shift_z, self._shift_y = z.mean(axis=0), y.mean(axis=0)
            target_dtype = np.asarray(targets).dtype
            if np.issubdtype(target_dtype, np.floating):
                self._dtype = target_dtype
        z = z - self._shift_z
        y = y - self._shift_y
        self.count += z.shape[0]
        self._sum_z += z.sum(axis=0)
        self._sum_y += y.sum(axis=0)
        self._zz += z.T @ z
        self._zy += z.T @ y
        self._yy += float(np.sum(y * y))

    def solve(self, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
        """P (n × k) and bias b (n,); λ = ridge · trace(centred ZᵀZ)/k.

        A relative ridge behaves the same whatever the activation scale; it only matters when
        Z has (nearly) dependent columns, e.g. a rank larger than the data supports.
        """
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        mean_z, mean_y, gram, cross = self.centred()
        scale = np.trace(gram) / self.k
        lam = ridge * scale if scale > 0 else ridge
        projection_t = solve_symmetric(gram + lam * np.eye(self.k), cross)
        projection = projection_t.T
        bias = mean_y - projection @ mean_z
        return projection.astype(self._dtype), bias.astype(self._dtype)

    def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(mean of Z, mean of Y, Σ (z − z̄)(z − z̄)ᵀ, Σ (z − z̄)(y − ȳ)ᵀ) over every added sample."""
        if self.count == 0:
            raise ValueError("no samples were added")
        mean_z = self._sum_z / self.count
        mean_y = self._sum_y / self.count
        gram = self._zz - self.count * np.outer(mean_z, mean_z)
        cross = self._zy - self.count * np.outer(mean_z, mean_y)
        return mean_z + self._shift_z, mean_y + self._shift_y, gram, cross

    def merge(self, other: LeastSquaresAccumulator) -> None:
        """Add another accumulator's samples to this one (their sums moved to this shift)."""
        if (other.k, other.n) != (self.k, self.n):
            raise ValueError(f"cannot merge a {other.k}×{other.n} fit into a {self.k}×{self.n}")
        if other.count == 0:
            return
        if self.count == 0:
            self.__dict__.update(copy.deepcopy(other.__dict__))
            return
        dz, dy, m = other._shift_z - self._shift_z, other._shift_y - self._shift_y, other.count
        self._zz += other._zz + np.outer(dz, other._sum_z) + np.outer(other._sum_z, dz)
        self._zz += m * np.outer(dz, dz)
        self._zy += other._zy + np.outer(dz, other._sum_y) + np.outer(other._sum_z, dy)
        self._zy += m * np.outer(dz, dy)
        self._yy += other._yy + 2.0 * float(dy @ other._sum_y) + m * float(dy @ dy)
        self._sum_z += other._sum_z + m * dz
        self._sum_y += other._sum_y + m * dy
        self.count += m

    def residual_sum_of_squares(self, projection: np.ndarray, bias: np.ndarray) -> float:
        """Σ‖y − P z − b‖² over every added sample, from the sums alone.

        Lets a caller check that a refit beats the initial factor without keeping activations.
        Accurate to roughly 1e-12 of Σ‖y − ȳ‖² (it is a difference of accumulated sums).
        """
        p = np.asarray(projection, dtype=np.float64)
        # The model in shifted coordinates: ỹ ≈ P z̃ + offset.
        offset = np.asarray(bias, dtype=np.float64) + p @ self._shift_z - self._shift_y
        rss = (
            self._yy
            + float(np.sum((p @ self._zz) * p))
            + self.count * float(offset @ offset)
            - 2.0 * float(np.sum(p.T * self._zy))
            - 2.0 * float(offset @ self._sum_y)
            + 2.0 * float(offset @ (p @ self._sum_z))
        )
        return max(rss, 0.0)


def refit_least_squares(
    inputs: np.ndarray, targets: np.ndarray, ridge: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """One-shot refit: P (n × k) and b (n,) fitting targets Y (samples × n) from Z (samples × k)."""
    z = np.asarray(inputs)
    y = np.asarray(targets)
    if z.ndim != 2 or y.ndim != 2:
        raise ValueError(f"expected 2-D inputs and targets, got {z.shape} and {y.shape}")
    accumulator = LeastSquaresAccumulator(z.shape[1], y.shape[1])
    accumulator.add(z, y)
    return accumulator.solve(ridge)


def solve_symmetric(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve a symmetric positive (semi)definite system; least squares when it is singular."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            return scipy.linalg.solve(matrix, rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning):
        # Singular or ill-conditioned (ridge 0 with dependent columns): minimum-norm solution.
        return scipy.linalg.lstsq(matrix, rhs)[0]
