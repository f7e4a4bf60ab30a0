"""`svd`: truncated SVD of linear layers and spatial SVD of convolutions (methods.md §2).

Gemm/MatMul with a constant 2-D weight: W ≈ A·B at rank r, two nodes through width r (either
side of the product; a Gemm keeps transA/transB on the activation, alpha goes into the
weight, beta·C onto the second node). k×k Conv (dense, kh, kw > 1): a kh×1 conv (c → r, the
vertical stride/dilation/pads) then a 1×kw conv (r → n, the horizontal ones, the bias)
(Jaderberg et al., BMVC 2014). 1×1 Conv: 1×1 (c → r, stride and pads) then 1×1 (r → n).

Bias of a right-side MatMul, for the calibration refit: when an Add of an [N] bias
initializer alone reads the MatMul's output (the usual transformer linear layer), the refit
fits the second MatMul and that bias through the Add, at no cost. Otherwise, only when a refit
will run (refit on and calibration data given), the rewrite ends in an Add of a zero bias (N
MACs per row, counted in the candidate) so the refit has a bias to set; without calibration
no Add is written. Refit sites: the second MatMul/Gemm ("matmul"), the second 1×1 conv
("conv1x1") and spatial SVD's 1×kw conv ("conv", on 1×kw patches; it always carries a bias,
zeros if the layer had none); left-side products (W @ x) have none, which their records say
under details.refit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import scipy.linalg

from onnxcompress.factorization import (
    Candidate,
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
from onnxcompress.layer_refit import RefitSite
from onnxcompress.layers import (
    ConvLayer,
    Namer,
    conv_node,
    horizontal_conv_node,
    vertical_conv_node,
)
from onnxcompress.linear_layers import (
    LinearLayer,
    conv_and_linear_layers,
    first_gemm_c,
    low_rank_nodes,
)
from onnxcompress.low_rank_refit import FirstFactor
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

NO_SITE_LEFT = "none: W @ x has its features on axis -2 (only x @ W factors are refit)"
NO_SITE_ROW_C = "none: C varies by row, so there is no [N] bias to refit"


# Without calibration data: the most MACs removed at which svd's weight-only fit kept every
# shared model within 5 top-1 points (docs/decisions.md#weight-only-default-budgets).
DEFAULT_TARGET = default_target(0.9)


@dataclass(frozen=True)
class SvdOptions:
    rank: int | None = option(None, "rank of every factorization (default: by budget or energy)")
    energy: float | None = option(None, "per layer: smallest cost keeping this fraction of ‖W‖²")
    target_macs: float | None = option(
        None,
        f"keep this fraction of the model's MACs ({DEFAULT_TARGET.help()}, when "
        "neither rank nor energy is given); ranks chosen for least total squared error (knapsack)",
    )
    align: int = option(16, "round ranks to multiples of this (ORT CPU speed)")
    conv: bool = option(True, "also factorize convs: spatial SVD of k×k, plain SVD of 1×1")
    never_slower: bool = never_slower_option()
    min_speedup: float = min_speedup_option()
    refit: bool = option(True, "refit the last factor and bias on calibration data")
    refit_both: bool = option(
        True,
        "with refit, also fit the first factor where it is a plain linear map (x @ A, 1×1 conv):"
        " both factors by reduced-rank regression on the data, chosen on held-out samples",
    )
    relu_aware: bool = relu_aware_option()
    activation_aware: bool = activation_aware_option()
    allocation: str = allocation_option()
    keep_collapsing: bool = keep_collapsing_option()
    keep: str | None = keep_option()

    def __post_init__(self) -> None:
        require_at_least_one(self, ("rank", "align"))
        require_fraction(self, ("target_macs", "energy"))
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup must be > 0, got {self.min_speedup}")


class SvdMethod:
    def __init__(self, options: SvdOptions, refit_data: bool) -> None:
        self.options = options
        self.refit_data = refit_data  # a refit will run: bias-less MatMuls get a bias Add

    def layers(self, model: onnx.ModelProto, analysis):
        layers, skips = conv_and_linear_layers(model, analysis)
        return layers, skips

    def skip_reason(self, layer: ConvLayer | LinearLayer) -> str:
        if isinstance(layer, LinearLayer):
            return ""
        if not self.options.conv:
            return "conv=false: convolutions are left alone"
        if layer.group != 1:
            kind = "depthwise" if layer.group == layer.in_channels else "grouped"
            return f"{kind} conv (group={layer.group}): svd applies to dense convs"
        kh, kw = layer.kernel
        if (kh == 1) != (kw == 1):
            return f"{kh}×{kw} kernel: spatial SVD needs kh > 1 and kw > 1"
        return ""

    def candidates(self, layer: ConvLayer | LinearLayer) -> list[Candidate]:
        matrix = _matrix(layer).astype(np.float64)
        squares = scipy.linalg.svdvals(matrix) ** 2
        tails = np.append(np.cumsum(squares[::-1])[::-1], 0.0)
        norm = float(tails[0]) or 1.0
        form, note = _form(layer), self._refit_note(layer)
        found = []
        for rank in self._rank_choices(min(matrix.shape)):
            macs, params = self._cost(layer, form, rank)
            config = {"form": form, "rank": rank}
            if note:
                config["refit"] = note
            error = float(np.sqrt(max(tails[rank], 0.0) / norm))
            found.append(Candidate(config, macs, params, error))
        return found

    def _rank_choices(self, maximum: int) -> list[int]:
        if self.options.rank:
            return [self.options.rank] if self.options.rank <= maximum else []
        return ranks.aligned_ranks(self.options.align, maximum)

    def _extra_add(self, layer: ConvLayer | LinearLayer) -> bool:
        return (
            self.refit_data
            and isinstance(layer, LinearLayer)
            and layer.op == "MatMul"
            and layer.side == "right"
            and layer.bias_add is None
        )

    def _refit_note(self, layer: ConvLayer | LinearLayer) -> str:
        if isinstance(layer, ConvLayer):
            return ""
        if layer.side == "left":
            return NO_SITE_LEFT
        if layer.op == "Gemm" and layer.bias is None and layer.c is not None:
            return NO_SITE_ROW_C
        return ""

    def _cost(self, layer: ConvLayer | LinearLayer, form: str, rank: int) -> tuple[int, int]:
        """(MACs, parameters) of the written rewrite, as `analyse` counts them."""
        if isinstance(layer, LinearLayer):
            k, n = layer.in_features, layer.out_features
            macs = layer.positions * ranks.matrix_macs_per_row(k, n, rank)
            params = rank * (k + n)
            if layer.op == "Gemm":
                if first_gemm_c(layer):  # the first Gemm's zero C, as wide as its output
                    params += rank if layer.side == "right" else 1
                params += n if layer.c is None and layer.side == "right" else 0
                params += layer.bias.size if layer.bias is not None else 0
                params += layer.c.size if layer.c is not None and layer.bias is None else 0
            if self._extra_add(layer):
                macs += layer.positions * n  # the Add counts one MAC per output element
                params += n
            return macs, params
        n, c, kh, kw = layer.weight.shape
        batch, out_h, out_w = layer.batch, layer.output_shape[2], layer.output_shape[3]
        if form == "pointwise":
            return batch * out_h * out_w * rank * (c + n), rank * (c + n) + n
        # The kh×1 conv keeps the input's width; the 1×kw conv brings it to the output's.
        in_w = layer.input_shape[3]
        macs = batch * out_h * (rank * c * kh * in_w + n * rank * kw * out_w)
        return macs, rank * c * kh + n * rank * kw + n  # the 1×kw conv always has a bias

    def build(self, layer: ConvLayer | LinearLayer, candidate: Candidate, namer: Namer) -> Rewrite:
        rank = candidate.config["rank"]
        if isinstance(layer, LinearLayer):
            a, b = factorize.matrix_factors(layer.weight, rank)
            nodes, inits, site = low_rank_nodes(layer, a, b, namer, "svd", self._extra_add(layer))
            if site and self.options.refit_both and not (layer.op == "Gemm" and layer.trans):
                prior = layer.weight.T.astype(np.float64)
                site.first = FirstFactor(layer.activation, nodes[0].input[1], "matmul", prior)
            return Rewrite(nodes, inits, site)
        if candidate.config["form"] == "pointwise":
            rewrite = _pointwise_rewrite(layer, rank, namer)
            if self.options.refit_both and _plain_pointwise(layer):
                n, c = layer.weight.shape[:2]
                prior = layer.weight.reshape(n, c).astype(np.float64)
                first = rewrite.nodes[0]
                rewrite.refit.first = FirstFactor(first.input[0], first.input[1], "conv1x1", prior)
            return rewrite
        return _spatial_rewrite(layer, rank, namer)


def _form(layer: ConvLayer | LinearLayer) -> str:
    if isinstance(layer, LinearLayer):
        return f"{layer.op.lower()}_{layer.side}"
    return "pointwise" if layer.kernel == (1, 1) else "spatial"


def _plain_pointwise(layer: ConvLayer) -> bool:
    """A 1×1 conv that is a matrix product at every pixel (its input rows are its inputs)."""
    return all(s == 1 for s in layer.strides) and not any(layer.pads)


def _matrix(layer: ConvLayer | LinearLayer) -> np.ndarray:
    """The matrix whose truncated SVD the rewrite uses (its singular values give the error)."""
    if isinstance(layer, LinearLayer):
        return layer.weight
    n, c, kh, kw = layer.weight.shape
    if (kh, kw) == (1, 1):
        return layer.weight.reshape(n, c)
    return layer.weight.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)  # as spatial_svd_factors


def _pointwise_rewrite(layer: ConvLayer, rank: int, namer: Namer) -> Rewrite:
    n, c = layer.weight.shape[:2]
    a, b = factorize.matrix_factors(layer.weight.reshape(n, c), rank)
    first, first_inits = conv_node(
        namer,
        f"{layer.name}.svd_first",
        layer.node.input[0],
        b.reshape(rank, c, 1, 1),
        kernel_shape=[1, 1],
        strides=list(layer.strides),
        pads=list(layer.pads),
    )
    last, last_inits, site = pointwise_output(
        namer, layer, first.output[0], a.reshape(n, rank, 1, 1), "svd_second"
    )
    return Rewrite([first, last], first_inits + last_inits, site)


def _spatial_rewrite(layer: ConvLayer, rank: int, namer: Namer) -> Rewrite:
    vertical, horizontal = factorize.spatial_svd_factors(layer.weight, rank)
    first, first_inits = vertical_conv_node(
        namer, layer, f"{layer.name}.svd_vertical", layer.node.input[0], vertical
    )
    bias = layer.bias if layer.bias is not None else np.zeros(layer.out_channels, vertical.dtype)
    last, last_inits = horizontal_conv_node(
        namer,
        layer,
        f"{layer.name}.svd_horizontal",
        first.output[0],
        horizontal,
        out=layer.node.output[0],
        bias=bias,
    )
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in last.attribute}
    geometry = {key: list(attrs[key]) for key in ("strides", "pads", "dilations")}
    site = RefitSite(
        first.output[0], last.output[0], last.input[1], last.input[2], "conv", conv=geometry
    )
    return Rewrite([first, last], first_inits + last_inits, site)


@register(
    "svd",
    SvdOptions,
    "truncated SVD: Gemm/MatMul → two through rank r; k×k Conv → k×1, 1×k",
    lossy=True,
)
def svd(model: onnx.ModelProto, options: SvdOptions, context: PassContext) -> PassResult:
    driver = DriverOptions.for_pass(
        options, options.rank is not None, DEFAULT_TARGET, context, "svd"
    )
    method = SvdMethod(options, refit_data=bool(options.refit and context.calibration))
    return run_factorization(model, method, driver, context, "svd")
