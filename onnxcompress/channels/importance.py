"""Channel importance and keep-masks, on arrays only (no graph, no onnxruntime).

Weight scores: the L1/L2 norm of each output channel's weights. Data scores: how much each
input channel contributes to a consumer's output, sqrt(E[x_c²] · ‖W[:, c]‖²) summed over the
features the channel owns (Molchanov/He-style activation × weight-column norm). Scores of the
several producers or consumers of one group are each normalised to mean 1, then summed, so no
single layer dominates. Kept counts are rounded to a multiple of `round_to`.
"""

from __future__ import annotations

import math

import numpy as np


def weight_channel_norms(weight: np.ndarray, axis: int, p: int = 2) -> np.ndarray:
    """Lp norm of the weights of each channel along `axis` (p = 1 or 2), in float64."""
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0).reshape(weight.shape[axis], -1)
    if p == 1:
        return np.abs(w).sum(axis=1)
    if p == 2:
        return np.sqrt(np.square(w).sum(axis=1))
    raise ValueError(f"p must be 1 or 2, got {p}")


def column_energy(weight: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """‖W[..., c, ...]‖² for every input position c along `axis`.

    For a grouped Conv weight [C_out, C_in/groups, ...] (axis 1) input position
    b·C_in/groups + j is read only by the output rows of group b.
    """
    w = np.square(np.asarray(weight, dtype=np.float64))
    if groups == 1:
        return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).sum(axis=1)
    if axis != 1:
        raise ValueError("grouped weights read their input channels on axis 1")
    rows = w.shape[0] // groups
    per_group = w.reshape(groups, rows, w.shape[1], -1).sum(axis=(1, 3))  # [groups, C_in/g]
    return per_group.reshape(-1)


def contribution_scores(
    input_energy: np.ndarray, columns: np.ndarray, repeat: int = 1
) -> np.ndarray:
    """Per channel sqrt(Σ E[x_f²]·‖W_f‖²) over the `repeat` features f the channel owns."""
    energy = np.asarray(input_energy, dtype=np.float64) * np.asarray(columns, dtype=np.float64)
    return np.sqrt(np.maximum(energy.reshape(-1, repeat).sum(axis=1), 0.0))


def normalised(scores: np.ndarray) -> np.ndarray:
    """Scores divided by their mean (all zeros stay zeros)."""
    scores = np.asarray(scores, dtype=np.float64)
    mean = float(scores.mean()) if scores.size else 0.0
    return scores / mean if mean > 0 else np.zeros_like(scores)


def combine_scores(vectors: list[np.ndarray]) -> np.ndarray:
    """The sum of several score vectors over the same channels, each normalised to mean 1."""
    if not vectors:
        raise ValueError("no score vectors to combine")
    return np.sum([normalised(v) for v in vectors], axis=0)


class ChannelMoments:
    """Running per-position sums of x and x² along one axis, fed batch by batch."""

    def __init__(self, size: int):
        self.count = 0
        self.sum = np.zeros(size)
        self.sum_squares = np.zeros(size)

    def add(self, values: np.ndarray, axis: int) -> None:
        rows = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
        rows = rows.reshape(-1, rows.shape[-1])
        if rows.shape[1] != self.sum.size:
            raise ValueError(f"expected {self.sum.size} positions, got {rows.shape[1]}")
        self.count += rows.shape[0]
        self.sum += rows.sum(axis=0)
        self.sum_squares += np.square(rows).sum(axis=0)

    def mean_square(self) -> np.ndarray:
        return self.sum_squares / max(self.count, 1)

    def variance(self) -> np.ndarray:
        mean = self.sum / max(self.count, 1)
        return np.maximum(self.mean_square() - mean * mean, 0.0)


def kept_count(channels: int, ratio: float, round_to: int = 8, blocks: int = 1) -> int:
    """Channels to keep when removing `ratio` of `channels`: the nearest multiple of
    lcm(round_to, blocks) (of `blocks` alone when the group is not wider than that),
    at least one unit, at most all of them."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    unit = _unit(channels, round_to, blocks)
    if ratio == 0:
        return channels
    units = math.floor(channels * (1 - ratio) / unit + 0.5)
    return int(min(channels, max(unit, units * unit)))


def allowed_counts(channels: int, round_to: int = 8, blocks: int = 1) -> list[int]:
    """Every kept count `kept_count` can return, largest (all channels) first."""
    unit = _unit(channels, round_to, blocks)
    return [channels] + [k for k in range(channels - 1, 0, -1) if k % unit == 0]


def _unit(channels: int, round_to: int, blocks: int) -> int:
    if channels < 1 or channels % blocks:
        raise ValueError(f"{channels} channels do not split into {blocks} blocks")
    unit = math.lcm(round_to, blocks)
    return blocks if channels <= round_to or unit >= channels else unit


def greedy_moves(
    damage: dict[int, np.ndarray],
    allowed: dict[int, list[int]],
    macs_per_channel: dict[int, float],
) -> list[tuple[int, int]]:
    """The order in which to shrink groups: each move takes one group to its next allowed
    kept count, the move with the least added damage per MAC saved first (damage[g][k] is
    group g's damage with k channels removed). Returns (group, new kept count) moves."""
    state = {g: 0 for g in allowed}  # index into allowed[g]
    moves = []
    while True:
        best, best_key = None, None
        for g, counts in allowed.items():
            i = state[g]
            if i + 1 >= len(counts) or macs_per_channel.get(g, 0) <= 0:
                continue
            total = counts[0]
            added = damage[g][total - counts[i + 1]] - damage[g][total - counts[i]]
            saved = (counts[i] - counts[i + 1]) * macs_per_channel[g]
            key = (max(added, 0.0) / saved, g)
            if best_key is None or key < best_key:
                best, best_key = g, key
        if best is None:
            return moves
        state[best] += 1
        moves.append((best, allowed[best][state[best]]))


def keep_mask(
    scores: np.ndarray,
    count: int,
    blocks: int = 1,
    ranges: list[tuple[int, int]] | tuple = (),
) -> np.ndarray:
    """Keep the `count` highest-scoring channels (ties: the lower index), the same number in
    each of `blocks` equal blocks, then make sure every (start, length) range keeps one
    channel by swapping in its best for the weakest kept channel of the same block."""
    scores = np.asarray(scores, dtype=np.float64)
    size = scores.size
    if size % blocks or count % blocks or not 0 < count <= size:
        raise ValueError(f"cannot keep {count} of {size} channels in {blocks} equal blocks")
    width, per_block = size // blocks, count // blocks
    mask = np.zeros(size, dtype=bool)
    for block in range(blocks):
        local = scores[block * width : (block + 1) * width]
        order = np.argsort(-local, kind="stable")[:per_block]
        mask[block * width + order] = True
    for start, length in ranges:
        if mask[start : start + length].any():
            continue
        best = start + int(np.argmax(scores[start : start + length]))
        block = best // width
        swappable = [
            c
            for c in np.flatnonzero(mask[block * width : (block + 1) * width]) + block * width
            if all(_still_kept(mask, c, r) for r in ranges)
        ]
        if swappable:
            weakest = min(swappable, key=lambda c: (scores[c], -c))
            mask[weakest], mask[best] = False, True
    return mask


def _still_kept(mask: np.ndarray, channel: int, rng: tuple[int, int]) -> bool:
    """Whether range `rng` still keeps a channel once `channel` is dropped."""
    start, length = rng
    if not start <= channel < start + length:
        return True
    return int(mask[start : start + length].sum()) > 1


def ranges_kept(mask: np.ndarray, ranges: list[tuple[int, int]] | tuple) -> bool:
    return all(mask[start : start + length].any() for start, length in ranges)


class CovarianceAccumulator:
    """Running centred covariance of feature rows, fed in batches (sums kept about the first
    batch's mean, so a large common offset does not cancel catastrophically)."""

    def __init__(self, size: int):
        self.count = 0
        self._shift = np.zeros(size)
        self._sum = np.zeros(size)
        self._outer = np.zeros((size, size))

    def add(self, rows: np.ndarray) -> None:
        x = np.asarray(rows, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self._sum.size:
            raise ValueError(f"expected rows of {self._sum.size} features, got {x.shape}")
        if self.count == 0 and len(x):
            self._shift = x.mean(axis=0)
        x = x - self._shift
        self.count += len(x)
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    def covariance(self) -> np.ndarray:
        """Σ (x − mean)(x − mean)ᵀ over every row added (a sum, not divided by the count)."""
        mean = self._sum / max(self.count, 1)
        return self._outer - self.count * np.outer(mean, mean)
