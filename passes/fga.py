"""`fga`: filter group approximation (Peng et al., ECCV 2018). A k×k Conv becomes a grouped
k×k Conv (g groups of r filters, original stride/pads/dilations) followed by a 1×1 Conv that
carries the bias; each input-channel group's unfolded weight gets its optimal rank-r SVD.
Variant `btd` (block-term) puts a learned 1×1 channel mixing (c → g·c′) in front."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

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
    spatial_conv_node,
)
from onnxcompress.maths import btd
from onnxcompress.maths import factors as factorize
from onnxcompress.maths import ranks as ranks
from onnxcompress.never_slower import min_speedup_option, never_slower_option
from onnxcompress.passkit import (
    PassContext,
    PassResult,
    option,
    require_at_least_one,
    require_fraction,
)
from onnxcompress.registry import register

VARIANTS = ("plain", "btd")


# Without calibration data: the most MACs removed at which fga's weight-only fit kept every
# shared model within 5 top-1 points (docs/decisions.md#weight-only-default-budgets).
DEFAULT_TARGET = default_target(0.95)


@dataclass(frozen=True)
class FgaOptions:
    groups: int | None = option(
        None, "groups per layer (default: searched; channels/group ≥ align)"
    )
    rank: int | None = option(None, "filters per group (default: chosen by budget or energy)")
    target_macs: float | None = option(
        None,
        f"keep this fraction of the model's MACs ({DEFAULT_TARGET.help()}, when "
        "neither rank nor energy is given); ranks chosen for least total squared error (knapsack)",
    )
    energy: float | None = option(None, "per layer: smallest cost keeping this fraction of ‖W‖²")
    align: int = option(16, "round ranks and group widths to multiples of this (ORT CPU speed)")
    variant: str = option(
        "plain",
        "plain: contiguous input-channel groups; btd: a leading 1×1 (c → g·c′) learns the "
        "channel mixing (block-term decomposition, fitted by alternating least squares)",
    )
    inner_channels: int | None = option(
        None, "btd only: channels per group after the leading 1×1, c′ (default c/groups)"
    )
    never_slower: bool = never_slower_option()
    min_speedup: float = min_speedup_option()
    refit: bool = option(True, "refit the 1×1 factor and bias on calibration data")
    relu_aware: bool = relu_aware_option()
    activation_aware: bool = activation_aware_option()
    allocation: str = allocation_option()
    keep_collapsing: bool = keep_collapsing_option()
    keep: str | None = keep_option()

    def __post_init__(self) -> None:
        require_at_least_one(self, ("groups", "rank", "align", "inner_channels"))
        require_fraction(self, ("target_macs", "energy"))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.inner_channels is not None and self.variant != "btd":
            raise ValueError("inner_channels applies to variant=btd only")


class FgaMethod(ConvMethod):
    options: FgaOptions

    @property
    def grouped_input(self) -> bool:
        """plain: the grouped conv reads the input, so input whitening must be diagonal."""
        return self.options.variant == "plain"

    def skip_reason(self, layer: ConvLayer) -> str:
        groups, inner, rank = self.options.groups, self.options.inner_channels, self.options.rank
        c = layer.in_channels
        reason = dense_spatial_reason(layer, "fga")
        if reason:
            return reason
        if inner is not None and inner * (groups or 1) > c:
            return f"groups·inner_channels = {groups or 1}·{inner} exceeds the {c} input channels"
        if groups and inner is None and c % groups:
            return f"groups={groups} does not divide {c} channels"
        if groups and rank:
            width = inner or c // groups
            maximum = min(layer.out_channels, width * layer.kernel[0] * layer.kernel[1])
            if rank > maximum:
                return f"rank={rank} exceeds the group's maximum rank {maximum}"
        return ""

    def candidates(self, layer: ConvLayer) -> list[Candidate]:
        n, c = layer.out_channels, layer.in_channels
        kh, kw = layer.kernel
        norm = float(np.sum(layer.weight.astype(np.float64) ** 2)) or 1.0
        btd = self.options.variant == "btd"
        found = []
        for groups in self._group_choices(c):
            inner = self._inner_channels(c, groups)
            tails = _tail_energy(layer.weight, groups, inner)
            for rank in self._rank_choices(min(n, inner * kh * kw)):
                config = {"groups": groups, "rank": rank}
                if btd:
                    config["inner_channels"] = inner
                    macs = fga_btd_macs(layer, groups, rank, inner)
                else:
                    macs = ranks.fga_macs_per_pixel(n, c, kh, kw, groups, rank) * (
                        layer.batch * layer.output_pixels
                    )
                params = (inner * c if btd else 0) * groups + groups * rank * inner * kh * kw
                params += n * groups * rank + n
                # plain: the exact error. btd: the error of its contiguous-groups start, an
                # upper bound (its alternating fit never does worse); `build` measures the fit.
                error = float(np.sqrt(tails[:, rank].sum() / norm))
                found.append(Candidate(config, macs, params, error))
        return found

    def _inner_channels(self, channels: int, groups: int) -> int:
        return self.options.inner_channels or channels // groups

    def _group_choices(self, channels: int) -> list[int]:
        if self.options.groups:
            return [self.options.groups]
        inner = self.options.inner_channels
        if inner is not None:  # btd with a fixed c′: any g with g·c′ ≤ c
            return [g for g in (1, 2, 4, 8, 16, 32, 64) if g * inner <= channels]
        # Powers of two that keep at least `align` input channels per group (an alignment
        # that narrow layers shrink, as their ranks do).
        limit = max(1, channels // ranks.layer_align(self.options.align, channels))
        return [g for g in (1, 2, 4, 8, 16, 32, 64) if g <= limit and channels % g == 0]

    def _rank_choices(self, maximum: int) -> list[int]:
        if self.options.rank:
            return [self.options.rank] if self.options.rank <= maximum else []
        return ranks.aligned_ranks(self.options.align, maximum)

    def build(self, layer: ConvLayer, candidate: Candidate, namer: Namer) -> Rewrite:
        groups, rank = candidate.config["groups"], candidate.config["rank"]
        nodes, inits = [], []
        x = layer.node.input[0]
        if self.options.variant == "btd":
            inner = candidate.config["inner_channels"]
            leading, grouped, pointwise = btd.fga_btd_factors(
                layer.weight, groups, rank, inner, seed=0
            )
            approx = btd.compose_fga_btd(leading, grouped, pointwise, groups)
            exact = factorize.relative_error(layer.weight, approx)
            candidate.config["weight_rel_error_exact"] = round(exact, 6)
            # No bias: the 1×1 maps the grouped conv's zero padding to zero, so it commutes
            # with the pads that follow.
            mix, mix_inits = conv_node(
                namer, f"{layer.name}.fga_leading", x, leading, kernel_shape=[1, 1]
            )
            nodes.append(mix)
            inits += mix_inits
            x = mix.output[0]
        else:
            grouped, pointwise = factorize.fga_factors(layer.weight, groups, rank)
        first, first_inits = spatial_conv_node(
            namer, layer, f"{layer.name}.fga_grouped", x, grouped, group=groups
        )
        last, last_inits, site = pointwise_output(
            namer, layer, first.output[0], pointwise, "fga_pointwise"
        )
        return Rewrite(nodes + [first, last], inits + first_inits + last_inits, site)


def fga_btd_macs(layer: ConvLayer, groups: int, rank: int, inner: int) -> int:
    """MACs of the btd subgraph: the leading 1×1 runs at the layer's *input* resolution
    (before the grouped conv's stride and pads), the other two at its output resolution."""
    n, c = layer.out_channels, layer.in_channels
    kh, kw = layer.kernel
    input_pixels = int(np.prod(layer.input_shape[2:])) * layer.input_shape[0]
    output_pixels = layer.output_pixels * layer.batch
    leading = groups * inner * c
    rest = ranks.fga_btd_macs_per_pixel(n, c, kh, kw, groups, rank, inner) - leading
    return leading * input_pixels + rest * output_pixels


def _tail_energy(weight: np.ndarray, groups: int, inner: int | None = None) -> np.ndarray:
    """tails[i, r] = error² of group i at rank r when group i keeps its first `inner` of the
    c/g contiguous channels (all of them by default): Σ_{j ≥ r} σ_j² of that block's unfolded
    weight, plus (in row 0) the energy of the channels no group keeps."""
    n, per_group = weight.shape[0], weight.shape[1] // groups
    inner = per_group if inner is None else inner
    w = weight.astype(np.float64)
    spectra, dropped = [], 0.0
    for i in range(groups):
        block = w[:, i * per_group : (i + 1) * per_group]
        spectra.append(np.linalg.svd(block[:, :inner].reshape(n, -1), compute_uv=False) ** 2)
        dropped += float(np.sum(block[:, inner:] ** 2))
    dropped += float(np.sum(w[:, groups * per_group :] ** 2))
    width = max(len(s) for s in spectra) + 1
    tails = np.zeros((groups, width))
    for i, sq in enumerate(spectra):
        tails[i, : len(sq)] = np.cumsum(sq[::-1])[::-1]
    tails[0] += dropped
    return tails


@register("fga", FgaOptions, "filter group approximation: k×k Conv → grouped k×k → 1×1", lossy=True)
def fga(model: onnx.ModelProto, options: FgaOptions, context: PassContext) -> PassResult:
    driver = DriverOptions.for_pass(
        options, options.rank is not None, DEFAULT_TARGET, context, "fga"
    )
    return run_factorization(model, FgaMethod(options), driver, context, "fga")
