"""SuRP, successive-refinement pruning (Isik, No, Weissman 2021/22; methods.md §4): an encoder
over pooled, per-tensor normalised weights, its entropy-coded stream, and a decoder that replays
the encoder's τ/λ recursion so decoded weights equal the encoder's reconstruction bit for bit.
The step loop is in maths/successive_pruning.py, the stream and its bytes in surp_stream.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from onnxcompress.coding.entropy import CodingError
from onnxcompress.coding.surp_stream import SurpStream, encode_payload, parse_payload
from onnxcompress.maths.successive_pruning import (
    StepRun,
    default_beta,
    max_steps_for,
    pool_weights,
    run_steps,
    threshold_constants,
)

# Prefix-size search for a bit budget overshoots its estimate by this much first.
_BUDGET_MARGIN = 1.15


@dataclass
class SurpResult:
    stream: SurpStream
    weights: dict[str, np.ndarray]  # exactly decode_stream(stream)
    size: int
    nonzeros: int
    steps: int
    refreshes: int
    tail_fit_refreshes: int  # refreshes that fitted λ to the tail (successive_pruning._refresh)
    beta: float


def surp_encode(
    weights: dict[str, np.ndarray],
    sparsity: float | None = 0.8,
    target_bits: int | None = None,
    max_steps: int | None = None,
    normalize: str = "rms",
    beta: float | None = None,
) -> SurpResult:
    """Run SuRP over `weights` (name → array) until `sparsity` (fraction of weights left zero)
    is reached, or — when `target_bits` is given — until the coded payload would exceed
    `target_bits` (sparsity then only bounds how far the encoder may go, None = no bound).

    `beta` is the paper's β, the number of weights expected above each threshold (default
    ln n). Larger β means smaller τ steps relative to the weights, cheaper index gaps (about
    log2(n/β) + 1.44 bits a step) and coarser survivors.
    """
    if sparsity is not None and not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity {sparsity} is not in [0, 1]")
    names = tuple(weights)
    shapes = tuple(tuple(int(d) for d in np.shape(weights[k])) for k in names)
    mags, negative, scales = pool_weights(weights, normalize)
    n = mags.size
    beta = default_beta(n) if beta is None else float(beta)
    if not 1.0 <= beta <= max(n, 1):
        raise ValueError(f"beta {beta} is not in [1, n = {n}]")
    c, growth = threshold_constants(n, beta)
    positive = int(np.count_nonzero(mags))
    limit = positive if sparsity is None else min(positive, round((1.0 - sparsity) * n))
    steps_cap = max_steps_for(n) if max_steps is None else min(max_steps, max_steps_for(n))
    base = SurpStream(names, shapes, scales, c, growth, 0.0, *_empty_steps())
    estimate = None
    if target_bits is not None:
        overhead = 8 * len(encode_payload(base)) + 64
        estimate = (_BUDGET_MARGIN * target_bits, overhead)
    run = run_steps(mags, c, growth, beta, limit, steps_cap, estimate)
    stream = _stream_prefix(run, base, negative, run.picks.size)
    if target_bits is not None:
        stream = _largest_prefix_within(run, base, negative, target_bits)
    decoded = decode_stream(stream)
    return SurpResult(
        stream=stream,
        weights=decoded,
        size=n,
        nonzeros=int(sum(np.count_nonzero(v) for v in decoded.values())),
        steps=stream.steps,
        refreshes=int(stream.refresh_steps.size),
        tail_fit_refreshes=int(np.count_nonzero(run.tail_fits[: stream.refresh_steps.size])),
        beta=beta,
    )


def _empty_steps() -> tuple:
    empty = np.zeros(0, np.int64)
    return empty, empty, np.zeros(0, np.float32), np.zeros(0, np.uint8)


def _stream_prefix(run: StepRun, base: SurpStream, negative: np.ndarray, steps: int) -> SurpStream:
    """The stream of the run's first `steps` steps: gaps of the cyclic scan, the refreshes
    before them and a sign per picked weight."""
    picks = run.picks[:steps]
    previous = np.concatenate([[-1], picks[:-1]])
    gaps = (picks - previous - 1) % max(run.n, 1)
    kept = run.refresh_steps < steps
    chosen = np.zeros(run.n, bool)
    chosen[picks] = True
    return replace(
        base,
        initial_lambda=run.initial_lambda,
        gaps=gaps.astype(np.int64),
        refresh_steps=run.refresh_steps[kept],
        refresh_lambdas=run.refresh_lambdas[kept],
        signs=negative[chosen].astype(np.uint8),
    )


def _largest_prefix_within(
    run: StepRun, base: SurpStream, negative: np.ndarray, target_bits: int
) -> SurpStream:
    """The longest prefix of the run whose coded payload fits in `target_bits` (bisection)."""
    low, high = 0, run.picks.size
    best = _stream_prefix(run, base, negative, 0)
    if 8 * len(encode_payload(best)) > target_bits:
        return best  # the header alone is over budget: send no steps
    while low < high:
        middle = (low + high + 1) // 2
        candidate = _stream_prefix(run, base, negative, middle)
        if 8 * len(encode_payload(candidate)) <= target_bits:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best


def replay_magnitudes(stream: SurpStream) -> np.ndarray:
    """The pooled reconstruction ŵ (float64, normalised magnitudes): the τ/λ recursion rerun
    from the received gaps and refresh values, the same float64 operations in the same order
    as the encoder (λ ← λ·growth one step at a time; ŵ summed in step order)."""
    n = stream.size
    steps = stream.steps
    if steps == 0:
        return np.zeros(n)
    picks = (np.cumsum(stream.gaps + 1) - 1) % n
    taus = float(stream.c) / _lambdas(stream)
    # bincount adds the weights of equal indices one after another, in step order.
    return np.bincount(picks, weights=taus, minlength=n)


def _lambdas(stream: SurpStream) -> np.ndarray:
    """λ at each step: the encoder's λ ← λ·growth one step at a time, restarted at each
    refresh. multiply.accumulate multiplies strictly in order, so every value is the one the
    encoder's loop computed. Loops over segments or over positions in them, whichever is fewer
    (at most √steps iterations), so a crafted stream of many refreshes stays fast too."""
    steps, growth = stream.steps, float(stream.growth)
    lams = np.full(steps, growth)
    starts = np.concatenate([[0], stream.refresh_steps]).astype(np.int64)
    seeds = np.concatenate([[stream.initial_lambda], stream.refresh_lambdas]).astype(np.float64)
    if starts.size > 1 and starts[1] == 0:  # a refresh before step 0 replaces λ0
        starts, seeds = starts[1:], seeds[1:]
    lams[starts] = seeds
    lengths = np.diff(np.append(starts, steps))
    if starts.size <= int(lengths.max()):
        for start, stop in zip(starts.tolist(), (starts + lengths).tolist(), strict=True):
            np.multiply.accumulate(lams[start:stop], out=lams[start:stop])
    else:
        for offset in range(1, int(lengths.max())):
            inside = starts[lengths > offset] + offset
            lams[inside] = lams[inside - 1] * growth
    return lams


def decode_stream(stream: SurpStream) -> dict[str, np.ndarray]:
    """Float32 weights (name → array): ŵ × sign × scale of each tensor, in float64, rounded once."""
    magnitudes = replay_magnitudes(stream)
    chosen = np.zeros(stream.size, bool)
    if stream.steps:
        chosen[(np.cumsum(stream.gaps + 1) - 1) % stream.size] = True
    if int(np.count_nonzero(chosen)) != stream.signs.size:
        raise CodingError(
            f"{stream.signs.size} sign bits for {int(np.count_nonzero(chosen))} picked weights"
        )
    negative = np.zeros(stream.size, bool)
    negative[chosen] = stream.signs.astype(bool)
    weights, start = {}, 0
    for name, shape, scale in zip(stream.names, stream.shapes, stream.scales, strict=True):
        stop = start + math.prod(shape)
        values = magnitudes[start:stop] * np.float64(scale)
        values[negative[start:stop]] *= -1.0
        weights[name] = values.astype(np.float32).reshape(shape)
        start = stop
    return weights


def decode_payload(payload: bytes) -> dict[str, np.ndarray]:
    """Name → float32 weight of every tensor in a SuRP payload (see `encode_payload`)."""
    return decode_stream(parse_payload(payload))
