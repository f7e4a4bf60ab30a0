"""`tucker2`: Tucker-2 decomposition of a k×k Conv on its channel modes (Kim et al., ICLR 2016).
The Conv becomes 1×1 (c → r_in) → k×k core (r_in → r_out, original stride/pads/dilations)
→ 1×1 (r_out → n) that carries the bias; the factors come from tensorly's `partial_tucker`."""

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
from onnxcompress.low_rank_refit import MAX_FEATURES, FirstFactor
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

# Without calibration data: the most MACs removed at which tucker2's weight-only fit kept every
# shared model within 5 top-1 points (docs/decisions.md#weight-only-default-budgets).
DEFAULT_TARGET = default_target(0.95)


@dataclass(frozen=True)
class Tucker2Options:
    rank_in: int | None = option(
        None, "width after the leading 1×1 (default: chosen by budget, energy or vbmf)"
    )
    rank_out: int | None = option(
        None, "width of the core's output (default: chosen by budget, energy or vbmf)"
    )
    target_macs: float | None = option(
        None,
        f"keep this fraction of the model's MACs ({DEFAULT_TARGET.help()}, unless both "
        "ranks, energy or vbmf are given); ranks chosen for least total squared error (knapsack)",
    )
    energy: float | None = option(
        None, "per layer: cheapest ranks whose truncated HOSVD keeps this fraction of ‖W‖²"
    )
    vbmf: bool = option(
        False, "per layer: ranks by EVBMF of the weight's mode-0/mode-1 unfoldings, aligned"
    )
    align: int = option(16, "round ranks to multiples of this (ORT CPU speed)")
    never_slower: bool = never_slower_option()
    min_speedup: float = min_speedup_option()
    refit: bool = option(True, "refit the last 1×1 factor and bias on calibration data")
    refit_both: bool = option(
        True,
        "with refit, fit the core and the last 1×1 together: reduced-rank regression of the "
        "original layer's outputs on the core's input patches, chosen on held-out samples",
    )
    relu_aware: bool = relu_aware_option()
    activation_aware: bool = activation_aware_option()
    allocation: str = allocation_option()
    keep_collapsing: bool = keep_collapsing_option()
    keep: str | None = keep_option()

    def __post_init__(self) -> None:
        require_at_least_one(self, ("rank_in", "rank_out", "align"))
        require_fraction(self, ("target_macs", "energy"))
        if self.vbmf and (self.rank_in is not None or self.rank_out is not None):
            raise ValueError("vbmf chooses the ranks: do not give rank_in/rank_out with it")
        if self.vbmf and self.energy is not None:
            raise ValueError("give either vbmf or energy, not both")


class Tucker2Method(ConvMethod):
    options: Tucker2Options

    def skip_reason(self, layer: ConvLayer) -> str:
        reason = dense_spatial_reason(layer, "tucker2")
        if reason:
            return reason
        for name, rank, channels, side in (
            ("rank_in", self.options.rank_in, layer.in_channels, "input"),
            ("rank_out", self.options.rank_out, layer.out_channels, "output"),
        ):
            if rank is not None and rank > channels:
                return f"{name}={rank} exceeds the layer's {channels} {side} channels"
        return ""

    def candidates(self, layer: ConvLayer) -> list[Candidate]:
        n, c = layer.out_channels, layer.in_channels
        kh, kw = layer.kernel
        kept = _hosvd_kept_energy(layer.weight)
        norm = float(np.sum(layer.weight.astype(np.float64) ** 2)) or 1.0
        if self.options.vbmf:
            pairs = [self._vbmf_ranks(layer)]
        else:
            pairs = [
                (r_in, r_out)
                for r_in in self._rank_choices(self.options.rank_in, c)
                for r_out in self._rank_choices(self.options.rank_out, n)
            ]
        found = []
        for r_in, r_out in pairs:
            params = r_in * c + r_out * r_in * kh * kw + n * r_out + n
            # The truncated HOSVD's error, exactly: with orthonormal factors ‖W − Ŵ‖² =
            # ‖W‖² − ‖core‖². HOOI (partial_tucker, started from the HOSVD) only improves on it,
            # so this is an upper bound on the error of the factors `build` writes.
            error = float(np.sqrt(max(0.0, 1.0 - kept[r_out, r_in] / norm)))
            config = {"rank_in": r_in, "rank_out": r_out}
            found.append(Candidate(config, tucker2_macs(layer, r_in, r_out), params, error))
        return found

    def _rank_choices(self, explicit: int | None, maximum: int) -> list[int]:
        if explicit is not None:
            return [explicit] if explicit <= maximum else []
        # Multiples of the alignment below the channel count, and the channel count itself.
        return ranks.aligned_ranks(self.options.align, maximum, include_maximum=True)

    def _vbmf_ranks(self, layer: ConvLayer) -> tuple[int, int]:
        w = layer.weight.astype(np.float64)
        n, c = layer.out_channels, layer.in_channels
        r_out = max(1, ranks.vbmf_rank(w.reshape(n, -1)))
        r_in = max(1, ranks.vbmf_rank(w.transpose(1, 0, 2, 3).reshape(c, -1)))
        align = self.options.align
        return (
            ranks.align_rank(r_in, ranks.layer_align(align, c), c),
            ranks.align_rank(r_out, ranks.layer_align(align, n), n),
        )

    def build(self, layer: ConvLayer, candidate: Candidate, namer: Namer) -> Rewrite:
        r_in, r_out = candidate.config["rank_in"], candidate.config["rank_out"]
        first, core, last = factorize.tucker2_factors(layer.weight, r_in, r_out)
        # The ladder ranks candidates by the HOSVD bound; the chosen factors' error is cheap.
        approx = factorize.compose_tucker2(first, core, last)
        exact = factorize.relative_error(layer.weight, approx)
        candidate.config["weight_rel_error_exact"] = round(exact, 6)
        reduce, reduce_inits = conv_node(
            namer, f"{layer.name}.tucker2_in", layer.node.input[0], first, kernel_shape=[1, 1]
        )
        spatial, spatial_inits = spatial_conv_node(
            namer, layer, f"{layer.name}.tucker2_core", reduce.output[0], core
        )
        expand, expand_inits, site = pointwise_output(
            namer, layer, spatial.output[0], last, "tucker2_out"
        )
        if self.options.refit_both and core[0].size <= MAX_FEATURES:
            site.first = _core_factor(layer, spatial, core, last)
        return Rewrite([reduce, spatial, expand], reduce_inits + spatial_inits + expand_inits, site)


def _core_factor(layer: ConvLayer, spatial: onnx.NodeProto, core, last) -> FirstFactor:
    """The core as the first of two factors fitted together, on the patches of its input."""
    geometry = {"strides": list(layer.strides), "pads": list(layer.pads)}
    geometry["dilations"] = list(layer.dilations)
    prior = last.reshape(len(last), -1).astype(np.float64) @ core.reshape(len(core), -1)
    return FirstFactor(
        spatial.input[0], spatial.input[1], "conv", prior, geometry, tuple(layer.kernel)
    )


def tucker2_macs(layer: ConvLayer, r_in: int, r_out: int) -> int:
    """MACs of the written subgraph: the leading 1×1 runs at the layer's *input* resolution
    (before the core's stride and pads), the core and the last 1×1 at its output resolution."""
    n, c = layer.out_channels, layer.in_channels
    kh, kw = layer.kernel
    input_pixels = int(np.prod(layer.input_shape[2:])) * layer.input_shape[0]
    output_pixels = layer.output_pixels * layer.batch
    at_output = ranks.tucker2_macs_per_pixel(n, c, kh, kw, r_in, r_out) - r_in * c
    return r_in * c * input_pixels + at_output * output_pixels


def _hosvd_kept_energy(weight: np.ndarray) -> np.ndarray:
    """kept[r_out, r_in] = ‖core‖² of the HOSVD of W truncated to (r_out, r_in), for every pair.

    U_out, U_in are the left singular vectors of the mode-0 (output channel) and mode-1 (input
    channel) unfoldings; the full core G = U_outᵀ ×₀ W ×₁ U_inᵀ is computed once, and a 2-D
    cumulative sum of its per-(i, j) energies gives every truncation. Shape (n + 1, c + 1).
    """
    w = weight.astype(np.float64)
    n, c = w.shape[:2]
    u_out = np.linalg.svd(w.reshape(n, -1), full_matrices=False)[0]
    u_in = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(c, -1), full_matrices=False)[0]
    core = np.einsum("np,ncab,cq->pqab", u_out, w, u_in, optimize=True)
    energy = np.sum(core**2, axis=(2, 3)).cumsum(axis=0).cumsum(axis=1)
    kept = np.zeros((n + 1, c + 1))
    p, q = energy.shape
    kept[1 : p + 1, 1 : q + 1] = energy
    # Ranks beyond an unfolding's rank keep no more than its full rank does.
    kept[p + 1 :, :] = kept[p, :]
    kept[:, q + 1 :] = kept[:, q : q + 1]
    return kept


@register("tucker2", Tucker2Options, "Tucker-2: k×k Conv → 1×1 → k×k core → 1×1", lossy=True)
def tucker2(model: onnx.ModelProto, options: Tucker2Options, context: PassContext) -> PassResult:
    explicit = (options.rank_in is not None and options.rank_out is not None) or options.vbmf
    driver = DriverOptions.for_pass(options, explicit, DEFAULT_TARGET, context, "tucker2")
    return run_factorization(model, Tucker2Method(options), driver, context, "tucker2")
