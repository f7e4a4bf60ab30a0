"""SuRP, successive-refinement pruning (Isik, No, Weissman 2021/22; methods.md §4): an encoder
over pooled, per-tensor normalised weights, its entropy-coded stream, and a decoder that replays
the encoder's τ/λ recursion so decoded weights equal the encoder's reconstruction bit for bit."""

from __future__ import annotations

import heapq
import json
import math
import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np

from onnxcompress.coding.entropy import (
    CodingError,
    charge,
    decode_bits,
    decode_gaps,
    encode_bits,
    encode_gaps,
    pack_sections,
    unpack_sections,
)

VERSION = 1
NORMALIZATIONS = ("rms", "l2", "none")
# λ is also refreshed when more than CROWD·β weights pass τ at once (see _refresh), for a
# smaller file at the same accuracy; see docs/decisions.md#crowd
CROWD = 64.0
# Prefix-size search for a bit budget overshoots its estimate by this much first.
_BUDGET_MARGIN = 1.15
# The encoder stops after 64·n + 64 steps; a stream with more is refused unread.
STEPS_PER_WEIGHT = 64
_MAX_META = 1 << 22  # bytes of JSON header (names, shapes) a payload may unpack to
_MAX_WEIGHTS = 1 << 40  # pooled weights beyond any model this tool can write


@dataclass(frozen=True)
class SurpStream:
    """Everything the decoder needs. Steps pick pooled indices in a cyclic scan: step k picks
    (previous pick + gaps[k] + 1) mod n and adds τ_k = c / λ_k there; λ grows by `growth` after
    each step and is replaced by refresh_lambdas[j] before step refresh_steps[j]."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    scales: np.ndarray  # float32 per tensor: pooled value × scale = weight
    c: float  # ln(n/β): τ = c / λ
    growth: float  # n / (n − c)
    initial_lambda: float  # a float32 value, used in float64
    gaps: np.ndarray  # int64, one per step
    refresh_steps: np.ndarray  # int64, non-decreasing, each in [0, steps)
    refresh_lambdas: np.ndarray  # float32 values
    signs: np.ndarray  # uint8, 1 = negative; one per nonzero, in pooled (flat) order

    @property
    def size(self) -> int:
        return int(sum(math.prod(shape) for shape in self.shapes))

    @property
    def steps(self) -> int:
        return int(self.gaps.size)


@dataclass
class SurpResult:
    stream: SurpStream
    weights: dict[str, np.ndarray]  # exactly decode_stream(stream)
    size: int
    nonzeros: int
    steps: int
    refreshes: int
    tail_fit_refreshes: int  # refreshes where λ = 1/mean(u) did not do (see _refresh)
    beta: float


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
    crowd = CROWD * beta
    positive = int(np.count_nonzero(mags))
    limit = positive if sparsity is None else min(positive, round((1.0 - sparsity) * n))
    steps_cap = max_steps_for(n) if max_steps is None else min(max_steps, max_steps_for(n))
    base = SurpStream(names, shapes, scales, c, growth, 0.0, *_empty_steps())
    estimate = None
    if target_bits is not None:
        overhead = 8 * len(encode_payload(base)) + 64
        estimate = (_BUDGET_MARGIN * target_bits, overhead)
    run = _Encoder(mags, c, growth, beta, crowd).run(limit, steps_cap, estimate)
    stream = run.stream(base, negative, run.picks.size)
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


def max_steps_for(n: int) -> int:
    """The most steps a stream over n pooled weights may have (the encoder's cap)."""
    return STEPS_PER_WEIGHT * n + 64


def _empty_steps() -> tuple:
    empty = np.zeros(0, np.int64)
    return empty, empty, np.zeros(0, np.float32), np.zeros(0, np.uint8)


class _Run:
    """The encoder's decisions; any prefix of the steps is itself a valid stream."""

    def __init__(self, n, lam0, picks, refresh_steps, refresh_lambdas, tail_fits):
        self.n = n
        self.initial_lambda = lam0
        self.picks = np.asarray(picks, np.int64)
        self.refresh_steps = np.asarray(refresh_steps, np.int64)
        self.refresh_lambdas = np.asarray(refresh_lambdas, np.float32)
        self.tail_fits = np.asarray(tail_fits, bool)

    def stream(self, base: SurpStream, negative: np.ndarray, steps: int) -> SurpStream:
        picks = self.picks[:steps]
        previous = np.concatenate([[-1], picks[:-1]])
        gaps = (picks - previous - 1) % max(self.n, 1)
        kept = self.refresh_steps < steps
        chosen = np.zeros(self.n, bool)
        chosen[picks] = True
        return replace(
            base,
            initial_lambda=self.initial_lambda,
            gaps=gaps.astype(np.int64),
            refresh_steps=self.refresh_steps[kept],
            refresh_lambdas=self.refresh_lambdas[kept],
            signs=negative[chosen].astype(np.uint8),
        )


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

    def run(self, wanted: int, steps_cap: int, estimate: tuple[float, int] | None) -> _Run:
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
        return _Run(n, lam0, picks, refresh_steps, refresh_lambdas, tail_fits)

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


def _largest_prefix_within(
    run: _Run, base: SurpStream, negative: np.ndarray, target_bits: int
) -> SurpStream:
    """The longest prefix of the run whose coded payload fits in `target_bits` (bisection)."""
    low, high = 0, run.picks.size
    best = run.stream(base, negative, 0)
    if 8 * len(encode_payload(best)) > target_bits:
        return best  # the header alone is over budget: send no steps
    while low < high:
        middle = (low + high + 1) // 2
        candidate = run.stream(base, negative, middle)
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


def encode_payload(stream: SurpStream) -> bytes:
    """The stream as bytes: version, CRC-32, then sections (header, numbers, gaps, refresh
    positions, signs). Gaps and refresh positions are range-coded as near-geometric integers,
    signs as bits; names/shapes go in a zlib'd JSON header, float side info as raw float32."""
    meta = {
        "names": list(stream.names),
        "shapes": [list(shape) for shape in stream.shapes],
        "steps": stream.steps,
        "refreshes": int(stream.refresh_steps.size),
    }
    numbers = (
        struct.pack("<ddf", stream.c, stream.growth, stream.initial_lambda)
        + np.asarray(stream.scales, "<f4").tobytes()
        + np.asarray(stream.refresh_lambdas, "<f4").tobytes()
    )
    refresh_gaps = np.diff(stream.refresh_steps, prepend=-1) - 1
    body = pack_sections(
        [
            zlib.compress(json.dumps(meta, separators=(",", ":")).encode(), 9),
            numbers,
            encode_gaps(stream.gaps),
            encode_gaps(refresh_gaps),
            encode_bits(stream.signs),
        ]
    )
    return bytes([VERSION]) + struct.pack("<I", zlib.crc32(body)) + body


def parse_payload(payload: bytes) -> SurpStream:
    """The stream in `payload`; CodingError if it is truncated, corrupted or of another version."""
    if len(payload) < 5:
        raise CodingError(f"SuRP payload of {len(payload)} bytes is truncated")
    if payload[0] != VERSION:
        raise CodingError(f"SuRP payload version {payload[0]}; this decoder reads {VERSION}")
    body = payload[5:]
    if struct.unpack("<I", payload[1:5])[0] != zlib.crc32(body):
        raise CodingError("SuRP payload is corrupted (checksum mismatch)")
    try:
        sections = unpack_sections(body)
        if len(sections) != 5:
            raise CodingError(f"SuRP payload has {len(sections)} sections, expected 5")
        meta = json.loads(_inflate_meta(sections[0]))
        names = tuple(str(name) for name in meta["names"])
        shapes = tuple(tuple(int(d) for d in shape) for shape in meta["shapes"])
        steps, refreshes = int(meta["steps"]), int(meta["refreshes"])
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise CodingError(f"SuRP payload header is malformed: {exc}") from exc
    return _stream_from_sections(names, shapes, steps, refreshes, sections)


def _inflate_meta(data: bytes) -> bytes:
    """The zlib'd JSON header, refused if it would unpack beyond _MAX_META bytes."""
    inflater = zlib.decompressobj()
    meta = inflater.decompress(data, _MAX_META)
    if inflater.unconsumed_tail or not inflater.eof:
        raise CodingError(f"header is truncated or unpacks to more than {_MAX_META} bytes")
    return meta


def _stream_from_sections(names, shapes, steps, refreshes, sections) -> SurpStream:
    tensors = len(names)
    if len(shapes) != tensors or any(d < 0 for shape in shapes for d in shape) or steps < 0:
        raise CodingError("SuRP payload header is inconsistent")
    n = sum(math.prod(shape) for shape in shapes)  # exact, before anything is allocated
    if n > _MAX_WEIGHTS or steps > max_steps_for(n) or not 0 <= refreshes <= steps:
        raise CodingError(f"SuRP payload header declares {steps} steps over {n} weights")
    numbers = sections[1]
    if len(numbers) != 20 + 4 * (tensors + refreshes):
        raise CodingError("SuRP payload side information has the wrong length")
    # Weights, and steps at the four arrays a step takes beyond its gap (picks, λ, τ, sums).
    charge(n + 4 * steps, "SuRP payload")
    c, growth, lam0 = struct.unpack("<ddf", numbers[:20])
    floats = np.frombuffer(numbers[20:], "<f4").astype(np.float32)
    scales, refresh_lambdas = floats[:tensors], floats[tensors:]
    refresh_gaps = decode_gaps(sections[3], refreshes)
    if refreshes and (refresh_gaps.min() < 0 or refresh_gaps.max() >= steps):
        raise CodingError("SuRP payload refreshes λ after its last step")
    refresh_steps = np.cumsum(refresh_gaps + 1) - 1
    gaps = np.asarray(decode_gaps(sections[2], steps), np.int64)
    side = np.concatenate([[c, growth, lam0], scales, refresh_lambdas])
    if not (np.all(np.isfinite(side)) and np.all(side > 0)) or (steps and n == 0):
        raise CodingError("SuRP payload side information is not finite and positive")
    # The encoder's gaps are below n; larger ones could make the sums below wrap around.
    if steps and (gaps.min() < 0 or gaps.max() >= n):
        raise CodingError("SuRP payload has a step outside the weights")
    if refresh_steps.size and (refresh_steps.min() < 0 or refresh_steps.max() >= steps):
        raise CodingError("SuRP payload refreshes λ after its last step")
    chosen = np.zeros(n, bool)
    if steps:
        chosen[(np.cumsum(gaps + 1) - 1) % n] = True
    signs = np.asarray(decode_bits(sections[4], int(np.count_nonzero(chosen))), np.uint8)
    return SurpStream(
        names, shapes, scales, c, growth, lam0, gaps,
        refresh_steps.astype(np.int64), refresh_lambdas, signs,
    )  # fmt: skip


def decode_payload(payload: bytes) -> dict[str, np.ndarray]:
    """Name → float32 weight of every tensor in a SuRP payload (see `encode_payload`)."""
    return decode_stream(parse_payload(payload))
