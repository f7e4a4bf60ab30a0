"""Which channels to keep so that the consumers' outputs suffer least once they are refit by
least squares (ThiNet, Luo et al. 2017; He et al. 2017 "Channel pruning"), solved exactly for
linear consumers by greedy backward elimination on each consumer's input covariance: pure numpy,
no graph. A channel that is a linear combination of the kept ones costs nothing to remove,
which a norm or activation score cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

CHUNK_DIVISOR = 32  # wide groups remove len(remaining) // 32 channels per elimination step


@dataclass
class LinearConsumer:
    """A consumer as y = x·B: covariance G of its input features (d × d), coefficients B
    (d × outputs), and the feature indices each group channel owns (channels not listed are
    not this consumer's to lose)."""

    covariance: np.ndarray
    coefficients: np.ndarray
    features: dict[int, np.ndarray]


def elimination_order(
    consumers: list[LinearConsumer], channels: int, ridge: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Remove channels one at a time, each time the one whose loss raises the consumers'
    summed relative least-squares error least, when each consumer is refit on what is left
    (ThiNet / He et al. 2017, solved exactly for linear consumers).

    Removing feature block F from a least-squares fit with inverse covariance Q and current
    coefficients β raises the residual by βᵀ_F (Q_FF)⁻¹ β_F; Q and β are then downdated with
    a Schur complement. Each consumer's increase is divided by its output energy tr(BᵀGB).
    Returns (channels in removal order — the last one is never removed —, the summed relative
    error after removing the first k channels, k = 0 … channels − 1). Groups of 64 channels
    and more remove len(remaining) // 32 at a time (then the errors within a step add up).
    """
    states = [_State(c, ridge) for c in consumers]
    remaining = list(range(channels))
    order, damage = [], [0.0]
    while len(remaining) > 1:
        costs = np.sum([s.costs(remaining) for s in states], axis=0) if states else None
        costs = np.zeros(len(remaining)) if costs is None else costs
        # Wide groups drop several of the cheapest at once (their costs taken as independent):
        # at most ~32·ln(channels) downdates; up to 63 channels it is one at a time, exact.
        take = max(1, min(len(remaining) - 1, len(remaining) // CHUNK_DIVISOR))
        picks = np.argsort(costs, kind="stable")[:take]
        chosen = [remaining[i] for i in picks]
        for state in states:
            state.remove(chosen)
        for i in picks:
            order.append(remaining[i])
            damage.append(damage[-1] + max(float(costs[i]), 0.0))
        remaining = [c for c in remaining if c not in set(chosen)]
    order.append(remaining[0])
    return np.array(order), np.array(damage)


class _State:
    """One consumer during elimination: Q = G⁻¹ and β over its remaining features."""

    def __init__(self, consumer: LinearConsumer, ridge: float):
        g = np.asarray(consumer.covariance, dtype=np.float64)
        b = np.asarray(consumer.coefficients, dtype=np.float64)
        scale = float(np.trace(g)) / max(g.shape[0], 1)
        lam = ridge * scale if scale > 0 else ridge
        self.q = _inverse(g + lam * np.eye(g.shape[0]))
        self.beta = b
        self.energy = max(float(np.sum(b * (g @ b))), 1e-30)
        self.position = np.arange(g.shape[0])  # original feature -> current row (-1: gone)
        self.features = consumer.features

    def costs(self, channels: list[int]) -> np.ndarray:
        """Added relative error of removing each channel (alone) from what is left."""
        found = np.zeros(len(channels))
        present = [i for i, c in enumerate(channels) if self._rows(c) is not None]
        if not present:
            return found
        rows = np.stack([self._rows(channels[i]) for i in present])  # [m, k]
        q_ff = self.q[rows[:, :, None], rows[:, None, :]]  # [m, k, k]
        b_f = self.beta[rows]  # [m, k, outputs]
        try:
            solved = np.linalg.solve(q_ff, b_f)
        except np.linalg.LinAlgError:
            solved = np.linalg.pinv(q_ff, hermitian=True) @ b_f
        found[present] = np.sum(b_f * solved, axis=(1, 2)) / self.energy
        return found

    def remove(self, channels: list[int]) -> None:
        """Drop the features of `channels`: Schur-complement downdate of Q and β."""
        present = [c for c in channels if self._rows(c) is not None]
        if not present:
            return
        rows = np.concatenate([self._rows(c) for c in present])
        rest = np.setdiff1d(np.arange(self.q.shape[0]), rows)
        gain = self.q[np.ix_(rest, rows)] @ _inverse(self.q[np.ix_(rows, rows)])
        self.beta = self.beta[rest] - gain @ self.beta[rows]
        self.q = self.q[np.ix_(rest, rest)] - gain @ self.q[np.ix_(rows, rest)]
        alive = self.position >= 0
        for c in present:
            self.position[self.features[c]] = -1
        self.position[alive & (self.position >= 0)] = np.arange(len(rest))

    def _rows(self, channel: int) -> np.ndarray | None:
        feats = self.features.get(channel)
        if feats is None or len(feats) == 0:
            return None
        return self.position[feats]


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix (Cholesky); pseudo-inverse if not."""
    try:
        factor = scipy.linalg.cho_factor(matrix)
        return scipy.linalg.cho_solve(factor, np.eye(matrix.shape[0]))
    except (np.linalg.LinAlgError, ValueError):
        return np.linalg.pinv(matrix, hermitian=True)
