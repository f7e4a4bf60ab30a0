"""The step loop of SuRP, successive-refinement pruning (Isik, No, Weissman 2021/22; methods.md
§4): pooled, per-tensor normalised weight magnitudes, the τ/λ thresholds and the encoder's
picks. Pure numpy; the encoder and decoder are in coding/surp.py, the stream's bytes in
coding/surp_stream.py."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

NORMALIZATIONS = ("rms", "l2", "none")
# λ is also refreshed when more than CROWD·β weights pass τ at once (see _refresh), for a
# smaller file at the same accuracy; see docs/decisions.md#crowd
CROWD = 64.0
# The encoder stops after 64·n + 64 steps; a stream with more is refused unread.
STEPS_PER_WEIGHT = 64


def default_beta(n: int) -> float:
    """The paper's β = ln n (at least 1): about ln n weights pass each threshold."""
    return max(math.log(n), 1.0) if n > 1 else 1.0


def threshold_constants(n: int, beta: float | None = None) -> tuple[float, float]:
    """(c, growth) for n pooled weights: c = ln(n/β), growth = n/(n − c).

    With β = ln n, c = ln(n/ln n) ≥ 1 for every n > 1 (n/ln n ≥ e); c is clamped to 1 so that τ
    stays a real step when β is close to n, and growth to 2 when n is tiny (n − c < 1).
    """
    beta = default_beta(n) if beta is None else beta
    c = max(math.log(max(n, 1) / beta), 1.0)
    growth = n / (n - c) if n - c >= 1.0 else 2.0
    return c, growth


def pool_weights(
    weights: dict[str, np.ndarray], normalize: str = "rms"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(magnitudes float64, negative mask, float32 scales) of all tensors, flattened in order.

    RMS by default: with the L2 norm (the official code's choice) every tensor gets unit
    energy, so an element of a 100k-weight tensor is ~300× smaller than one of a 1k-weight
    tensor and a global threshold would wipe out the big layers first. Dividing by the RMS
    puts every tensor's typical weight at 1, so the global threshold compares weights with
    their own layer's scale while still letting layers end up with different sparsities.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: expected one of {', '.join(NORMALIZATIONS)}")
    parts, negatives, scales = [], [], []
    for name, value in weights.items():
        flat = np.asarray(value, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(flat)):
            raise ValueError(f"tensor {name} has non-finite values")
        norm = float(np.sqrt(np.sum(flat * flat)))
        if normalize == "rms" and flat.size:
            norm /= math.sqrt(flat.size)
        scale = np.float32(norm if normalize != "none" else 1.0)
        if not (np.isfinite(scale) and scale > 0):
            scale = np.float32(1.0)  # all-zero (or underflowing) tensor: nothing to scale
        scales.append(scale)
        parts.append(np.abs(flat) / np.float64(scale))
        negatives.append(flat < 0)
    if not parts:
        return np.zeros(0), np.zeros(0, bool), np.zeros(0, np.float32)
    return np.concatenate(parts), np.concatenate(negatives), np.array(scales, np.float32)


def max_steps_for(n: int) -> int:
    """The most steps a stream over n pooled weights may have (the encoder's cap)."""
    return STEPS_PER_WEIGHT * n + 64


@dataclass(frozen=True)
class StepRun:
    """The encoder's decisions; any prefix of the steps is itself a valid stream."""

    n: int  # pooled weights
    initial_lambda: float  # a float32 value
    picks: np.ndarray  # int64, the pooled index each step subtracts τ from
    refresh_steps: np.ndarray  # int64, the step before which λ was replaced
    refresh_lambdas: np.ndarray  # float32, the λ each refresh set
    tail_fits: np.ndarray  # bool per refresh: λ = 1/mean(u) did not do (see _refresh)


def run_steps(
    magnitudes: np.ndarray,
    c: float,
    growth: float,
    beta: float,
    wanted: int,
    steps_cap: int,
    estimate: tuple[float, int] | None = None,
) -> StepRun:
    """Run SuRP's steps over pooled `magnitudes` (see `pool_weights`) until `wanted` weights
    are nonzero or `steps_cap` steps are taken; with `estimate` = (bits, overhead bits), also
    stop once the geometric-code estimate of the stream passes `bits`."""
    encoder = _Encoder(magnitudes, c, growth, beta, CROWD * beta)
    return encoder.run(wanted, steps_cap, estimate)


class _CandidateSet:
    """C = {i : u_i > τ} as a flag per index plus a count per block of 1024 indices, so the next
    member after a position is found with three short vectorised searches whatever |C| is."""

    BLOCK = 1024

    def __init__(self, n: int):
        self.flags = np.zeros(n, bool)
        self.counts = np.zeros(-(-n // self.BLOCK), np.int64)
        self.size = 0

    def add(self, indices: np.ndarray) -> None:
        self.flags[indices] = True
        np.add.at(self.counts, indices // self.BLOCK, 1)
        self.size += indices.size

    def add_one(self, index: int) -> None:
        self.flags[index] = True
        self.counts[index // self.BLOCK] += 1
        self.size += 1

    def remove(self, index: int) -> None:
        self.flags[index] = False
        self.counts[index // self.BLOCK] -= 1
        self.size -= 1

    def next_after(self, position: int) -> int:
        """The first member after `position`, wrapping around to 0 (C must not be empty)."""
        found = self._first_from(position + 1)
        return found if found >= 0 else self._first_from(0)

    def _first_from(self, start: int) -> int:
        if start >= self.flags.size:
            return -1
        block = start // self.BLOCK
        end = (block + 1) * self.BLOCK
        if self.counts[block]:
            hit = self.flags[start:end]
            offset = int(hit.argmax())
            if hit[offset]:
                return start + offset
        later = self.counts[block + 1 :] > 0
        if not later.any():
            return -1
        block += 1 + int(later.argmax())
        return block * self.BLOCK + int(self.flags[block * self.BLOCK :].argmax())


class _Encoder:
    """The SuRP step loop. Never-picked weights enter the candidate set as τ falls past their
    magnitude (looked up in the sorted magnitudes); picked weights whose residual fell below τ
    wait in a max-heap until τ falls past it again. Each step picks the next candidate after
    the previous pick (cyclic scan), so index gaps are near-geometric."""

    def __init__(self, mags: np.ndarray, c: float, growth: float, beta: float, crowd: float):
        self.u = mags.copy()
        self.c, self.growth, self.beta, self.crowd = c, growth, beta, crowd
        self.order = np.argsort(-mags, kind="stable")
        self.descending = -mags[self.order]  # ascending, for searchsorted
        self.entered = 0  # never-picked weights above τ are among the first `entered` of order
        self.chosen = np.zeros(mags.size, bool)
        self.candidates = _CandidateSet(mags.size)
        self.parked: list[tuple[float, int]] = []  # (−residual, index): picked, not above τ

    def run(self, wanted: int, steps_cap: int, estimate: tuple[float, int] | None) -> StepRun:
        u, c, growth, n = self.u, self.c, self.growth, self.u.size
        mean = float(np.mean(u)) if n else 0.0
        lam = float(np.float32(1.0 / mean)) if mean > 0 else 1.0
        lam0, tau = lam, c / lam
        picks: list[int] = []
        refresh_steps, refresh_lambdas, tail_fits = [], [], []
        chosen = self.chosen
        nonzeros, prev, limit = 0, -1, self.crowd
        while nonzeros < wanted and len(picks) < steps_cap:
            if estimate is not None and len(picks) % 1024 == 0 and picks:
                if _estimated_bits(picks, nonzeros, n, estimate[1]) > estimate[0]:
                    break
            self._admit(tau)
            if not 0 < self.candidates.size <= limit:
                lam, tail_fit = _refresh(u, c, self.beta, self.crowd)
                if lam is None:
                    break  # every residual is zero: nothing left to send
                tau, old_tau = c / lam, tau
                self._rebuild(tau, old_tau)
                # A tie group admitted as a whole may exceed the crowd: let it be worked off.
                limit = max(self.crowd, 2 * self.candidates.size)
                refresh_steps.append(len(picks))
                refresh_lambdas.append(lam)
                tail_fits.append(tail_fit)
            m = self.candidates.next_after(prev)
            picks.append(m)
            u[m] -= tau
            if not chosen[m]:
                chosen[m] = True
                nonzeros += 1
            lam *= growth
            tau = c / lam
            if not u[m] > tau:
                self.candidates.remove(m)
                if u[m] > 0:
                    heapq.heappush(self.parked, (-float(u[m]), m))
            prev = m
        return StepRun(
            n,
            lam0,
            np.asarray(picks, np.int64),
            np.asarray(refresh_steps, np.int64),
            np.asarray(refresh_lambdas, np.float32),
            np.asarray(tail_fits, bool),
        )

    def _admit(self, tau: float) -> None:
        """Add every index with u > τ to the candidates."""
        if self.entered < self.descending.size and -self.descending[self.entered] > tau:
            reached = int(np.searchsorted(self.descending, -tau, side="left"))
            fresh = self.order[self.entered : reached]
            fresh = fresh[~self.chosen[fresh]]  # picked weights come back through `parked`
            if fresh.size == 1:
                self.candidates.add_one(int(fresh[0]))
            elif fresh.size:
                self.candidates.add(fresh)
            self.entered = reached
        parked = self.parked
        while parked and -parked[0][0] > tau:
            self.candidates.add_one(heapq.heappop(parked)[1])

    def _rebuild(self, tau: float, old_tau: float) -> None:
        """Restore the invariants after a refresh: if τ rose, candidates no longer above it
        leave (picked ones to `parked`, never-picked ones back behind the entered prefix)."""
        if tau > old_tau:
            members = np.flatnonzero(self.candidates.flags)
            for index in members[self.u[members] <= tau].tolist():
                self.candidates.remove(index)
                if self.chosen[index] and self.u[index] > 0:
                    heapq.heappush(self.parked, (-float(self.u[index]), index))
            self.entered = int(np.searchsorted(self.descending, -tau, side="left"))
        self._admit(tau)


def _refresh(u: np.ndarray, c: float, beta: float, crowd: float) -> tuple[float | None, bool]:
    """The refreshed λ (a float32 value) and whether the tail fit was needed.

    The paper's λ = 1/mean(u), kept when between 1 and `crowd` residuals pass its τ. On real
    weights, whose tails are lighter than Laplacian, it mostly is not: τ = c·mean(u) is above
    every residual, or (later) so far into the bulk that thousands pass at once and a stop at
    the target sparsity would leave large weights unsent. λ is then fitted to the tail: τ goes
    to v, the ⌈β⌉+1-th largest residual, so about β pass, as P(u > τ) = β/n of the model asks;
    just below v when none is above it or v is tied by more than `crowd` residuals (fp16
    weights): a tie group enters as a whole, else τ would stall above it.
    """
    top = float(np.max(u)) if u.size else 0.0
    if top <= 0:
        return None, False
    lam = np.float32(1.0 / float(np.mean(u)))
    if np.isfinite(lam) and 0 < np.count_nonzero(u > c / float(lam)) <= crowd:
        return float(lam), False
    k = min(u.size, math.ceil(beta) + 1)
    v = float(np.partition(u, u.size - k)[u.size - k])
    lam = np.float32(c / v)
    if v == top or np.count_nonzero(u >= v) > crowd:
        while not c / float(lam) < v:
            lam = np.nextafter(lam, np.float32(np.inf))
    return float(lam), True


def _estimated_bits(picks: list[int], nonzeros: int, n: int, overhead: int) -> float:
    """Geometric-code estimate of the stream so far: steps × log2(e·mean gap) + signs."""
    mean_gap = max(n / 2, 1.0) if len(picks) < 2 else _mean_cyclic_gap(picks, n)
    return len(picks) * math.log2(math.e * (mean_gap + 1.0)) + nonzeros + overhead


def _mean_cyclic_gap(picks: list[int], n: int) -> float:
    recent = np.asarray(picks[-4096:], np.int64)
    return float(np.mean((recent[1:] - recent[:-1] - 1) % n))
