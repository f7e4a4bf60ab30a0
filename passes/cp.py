"""`cp`: CP decomposition of a k×k Conv (Lebedev et al., ICLR 2015). The Conv becomes
1×1 (c → R) → depthwise kh×1 (vertical stride/dilation/pads) → depthwise 1×kw (horizontal
ones) → 1×1 (R → n) that carries the bias; the factors come from CP-ALS
(`maths.cp_als`)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.auto import fit_cache as fit_cache
from onnxcompress.factorization import (
    Candidate,
    ConvMethod,
    DriverOptions,
    Rewrite,
    activation_aware_option,
    allocation_option,
    default_target,
    keep_collapsing_option,
    keep_option,
    pointwise_output,
    relu_aware_option,
    run_factorization,
)
from onnxcompress.layers import (
    ConvLayer,
    Namer,
    conv_node,
    dense_spatial_reason,
    horizontal_conv_node,
    vertical_conv_node,
)
from onnxcompress.maths import cp_als
from onnxcompress.maths import factors as factorize
from onnxcompress.never_slower import min_speedup_option, never_slower_option
from onnxcompress.passkit import (
    MAX_SEED,
    PassContext,
    PassResult,
    option,
    require_at_least_one,
    require_fraction,
)
from onnxcompress.registry import register

log = logging.getLogger(__name__)

# Ladder estimate: ALS sweeps per anchor rank, and how many anchors at most (see estimate_errors).
ESTIMATE_SWEEPS = 20
MAX_ANCHORS = 7


# Without calibration data: the most MACs removed at which cp's weight-only fit kept every
# shared model within 5 top-1 points (docs/decisions.md#weight-only-default-budgets).
DEFAULT_TARGET = default_target(0.8)


@dataclass(frozen=True)
class CpOptions:
    rank: int | None = option(None, "CP rank R per layer (default: chosen by the MACs budget)")
    target_macs: float | None = option(
        None,
        f"keep this fraction of the model's MACs ({DEFAULT_TARGET.help()}, when no rank "
        "is given); ranks chosen for least total estimated squared error (knapsack)",
    )
    align: int = option(16, "budget ranks are multiples of this (ORT CPU speed)")
    seed: int = option(0, "seed of the ALS initialisations: the same seed gives the same model")
    n_iter_max: int = option(100, "ALS sweeps at most per layer (records say if it converged)")
    never_slower: bool = never_slower_option()
    min_speedup: float = min_speedup_option()
    l2_reg: float = option(
        0.01,
        "ridge on the CP-ALS solves, relative to ‖W‖²/R: keeps cancelling components out, "
        "which int8 or fp16 activations would otherwise amplify (0: plain ALS)",
    )
    refit: bool = option(True, "refit the last 1×1 factor and bias on calibration data")
    relu_aware: bool = relu_aware_option()
    activation_aware: bool = activation_aware_option()
    allocation: str = allocation_option()
    keep_collapsing: bool = keep_collapsing_option()
    keep: str | None = keep_option()

    def __post_init__(self) -> None:
        require_at_least_one(self, ("rank", "align", "n_iter_max"))
        require_fraction(self, ("target_macs",))
        if self.l2_reg < 0:
            raise ValueError(f"l2_reg must be >= 0, got {self.l2_reg}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be from 0 to {MAX_SEED}, got {self.seed}")


class CpMethod(ConvMethod):
    options: CpOptions

    def skip_reason(self, layer: ConvLayer) -> str:
        reason = dense_spatial_reason(layer, "cp")
        if reason:
            return reason
        rank = self.options.rank
        if rank is not None and cp_macs(layer, rank) >= layer.macs:
            return f"rank {rank} saves no MACs ({cp_macs(layer, rank)} ≥ {layer.macs})"
        return ""

    def candidates(self, layer: ConvLayer) -> list[Candidate]:
        if self.options.rank is not None:
            # One rank: fit it for real now; `build` writes these factors.
            factors = self._fit(layer, self.options.rank)
            return [self._candidate(layer, self.options.rank, factors.relative_error, factors)]
        ladder = self._rank_choices(layer)
        errors = estimate_errors(layer.weight, ladder, seed=self.options.seed)
        return [self._candidate(layer, rank, errors[rank]) for rank in ladder]

    def _candidate(self, layer: ConvLayer, rank: int, error: float, factors=None) -> Candidate:
        n, c = layer.out_channels, layer.in_channels
        kh, kw = layer.kernel
        params = factorize.cp_macs_per_pixel(n, c, kh, kw, rank) + n
        config = {"rank": rank}
        if factors is None:
            config["estimated_rel_error"] = round(error, 6)
        return Candidate(config, cp_macs(layer, rank), params, error, factors)

    def _rank_choices(self, layer: ConvLayer) -> list[int]:
        """Multiples of `align` that save MACs (or the largest rank that does, if none)."""
        largest = (layer.macs - 1) // cp_macs(layer, 1)
        align = self.options.align
        return list(range(align, largest + 1, align)) or ([largest] if largest >= 1 else [])

    def _fit(self, layer: ConvLayer, rank: int) -> factorize.CPFactors:
        settings = {
            "rank": rank,
            "seed": self.options.seed,
            "n_iter_max": self.options.n_iter_max,
            "l2_reg": self.options.l2_reg,
        }

        def fit() -> dict[str, np.ndarray]:
            return dataclasses.asdict(factorize.cp_factors(layer.weight, **settings))

        # auto fits a layer at a rank in its sensitivity runs, each plan and the next run.
        arrays = fit_cache.cached_fit("cp", layer.weight, settings, fit)
        factors = factorize.CPFactors(
            **{name: value if value.ndim else value.item() for name, value in arrays.items()}
        )
        if not factors.converged:
            log.info(
                "%s: CP-ALS at rank %d did not converge in %d sweeps (relative error %.4g)",
                layer.name,
                rank,
                factors.iterations,
                factors.relative_error,
            )
        return factors

    def probe(self, layer: ConvLayer, candidate: Candidate, namer: Namer) -> Rewrite:
        """The rewrite with stand-in factors of the right shapes: enough to time it, without
        paying for a CP fit the timing may throw away."""
        rank, (n, c), (kh, kw) = candidate.config["rank"], layer.weight.shape[:2], layer.kernel
        shapes = [(rank, c, 1, 1), (rank, 1, kh, 1), (rank, 1, 1, kw), (n, rank, 1, 1)]
        stand_in = factorize.CPFactors(
            *(np.ones(shape, layer.weight.dtype) for shape in shapes), True, 0, 1.0
        )
        config = dict(candidate.config)
        return self.build(
            layer, dataclasses.replace(candidate, config=config, factors=stand_in), namer
        )

    def build(self, layer: ConvLayer, candidate: Candidate, namer: Namer) -> Rewrite:
        rank = candidate.config["rank"]
        cp = candidate.factors or self._fit(layer, rank)
        candidate.config.update(
            converged=bool(cp.converged),  # cp_factors may hand back a numpy bool
            iterations=int(cp.iterations),
            relative_error=round(cp.relative_error, 6),
        )
        candidate.error = cp.relative_error  # the record then shows the real, not the estimate
        first, first_inits = conv_node(
            namer, f"{layer.name}.cp_in", layer.node.input[0], cp.first, kernel_shape=[1, 1]
        )
        vertical, vertical_inits = vertical_conv_node(
            namer, layer, f"{layer.name}.cp_vertical", first.output[0], cp.vertical, group=rank
        )
        horizontal, horizontal_inits = horizontal_conv_node(
            namer,
            layer,
            f"{layer.name}.cp_horizontal",
            vertical.output[0],
            cp.horizontal,
            group=rank,
        )
        last, last_inits, site = pointwise_output(
            namer, layer, horizontal.output[0], cp.last, "cp_out"
        )
        inits = first_inits + vertical_inits + horizontal_inits + last_inits
        return Rewrite([first, vertical, horizontal, last], inits, site)


def cp_macs(layer: ConvLayer, rank: int) -> int:
    """MACs of the written subgraph, each factor at the resolution it really runs at: the first
    1×1 at the input's H×W, the vertical depthwise at H_out×W (its stride and pads change only
    H), the horizontal depthwise and the last 1×1 at H_out×W_out."""
    n, c = layer.out_channels, layer.in_channels
    kh, kw = layer.kernel
    batch, (h_in, w_in), (h_out, w_out) = layer.batch, layer.input_shape[2:], layer.output_shape[2:]
    return batch * rank * (c * h_in * w_in + kh * h_out * w_in + (kw + n) * h_out * w_out)


def estimate_errors(
    weight: np.ndarray, ranks: list[int], seed: int = 0, sweeps: int = ESTIMATE_SWEEPS
) -> dict[int, float]:
    """Relative CP error ‖W − W_R‖/‖W‖ for every rank in `ranks`, estimated cheaply.

    Fitting CP to convergence at every rung is too slow (see
    docs/decisions.md#estimate_sweeps-max_anchors). Instead a few anchor ranks (the
    largest R_max, then ¾, ½, ¼, … of it, and the smallest; see `_anchor_ranks`) get
    `sweeps` ALS sweeps, each started from the previous anchor's factors plus
    seeded random columns; log(error) is interpolated linearly in R between anchors, and a
    running minimum keeps it non-increasing (the best rank-R error cannot rise with R). Few
    sweeps overstate the error of large ranks a little; `build` records the real error.
    """
    ranks = sorted(set(ranks))
    if not ranks:
        return {}
    anchors = _anchor_ranks(ranks)
    w = np.asarray(weight, dtype=np.float64)
    rng = np.random.default_rng(seed)
    fitted, factors = [], None
    for rank in anchors:
        factors, error = _als(w, rank, sweeps, rng, factors)
        fitted.append(max(error, 1e-12))
    fitted = np.minimum.accumulate(fitted)
    curve = np.exp(np.interp(ranks, anchors, np.log(fitted)))
    return {rank: float(error) for rank, error in zip(ranks, curve, strict=True)}


def _anchor_ranks(ranks: list[int]) -> list[int]:
    """The ladder's ends and the rungs nearest ¾, ½, ¼, ⅛, … of its largest rank: the error
    falls fastest at the top of the ladder, where the rungs also cost the most to fit."""
    picked = {ranks[0], ranks[-1]}
    fractions = [0.75] + [0.5**k for k in range(1, 64)]
    for target in (ranks[-1] * f for f in fractions):
        if len(picked) >= MAX_ANCHORS or target <= ranks[0]:
            break
        picked.add(min(ranks, key=lambda r: abs(r - target)))
    return sorted(picked)


def _als(w: np.ndarray, rank: int, sweeps: int, rng: np.random.Generator, start=None):
    """`sweeps` ALS sweeps at `rank`, from `start` (factors of a lower rank) padded with random
    columns, or from random factors; returns the factors and the relative error."""
    if start is None:
        begin = tuple(rng.standard_normal((size, rank)) for size in w.shape)
    else:
        extra = rank - start[0].shape[1]
        begin = tuple(np.hstack([f, rng.standard_normal((f.shape[0], extra))]) for f in start)
    factors, errors = cp_als.als(w, begin, sweeps)
    return factors, errors[-1]


@register("cp", CpOptions, "CP: k×k Conv → 1×1 → depthwise kh×1 → depthwise 1×kw → 1×1", lossy=True)
def cp(model: onnx.ModelProto, options: CpOptions, context: PassContext) -> PassResult:
    driver = DriverOptions.for_pass(
        options, options.rank is not None, DEFAULT_TARGET, context, "cp"
    )
    return run_factorization(model, CpMethod(options), driver, context, "cp")
