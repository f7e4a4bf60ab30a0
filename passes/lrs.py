"""`lrs`: each layer as a low-rank plus a sparse part, W ≈ L + S (methods.md §3).

Graph (onnxcompress.lowrank_sparse_rewrite): the Conv (dense, any kh×kw) becomes a kh×kw Conv
(c → r, the layer's geometry) then a 1×1 Conv (r → n, the bias), plus a sparse branch with the
layer's geometry, summed by an `Add` that writes the layer's output; a right-side Gemm/MatMul
(x @ W) becomes two products through width r plus the sparse product. The rest of the graph
is unchanged.

Sparse branch: `structured=true` (default) zeroes whole input channels (features) of S, so
the branch reads only the kept ones, a `Gather` on the channel axis (constant indices) then
a smaller dense Conv/product: its MACs really fall. `structured=false` keeps an ℓ0 budget of
single entries, stored dense: it saves size after compression, never time or MACs on
onnxruntime, so it takes explicit `rank` and `sparsity` and no MAC budget.

Solver (onnxcompress.maths.lowrank_sparse): weight-only alternating projection (from two starts,
L first and S first, the better kept; or from tensorly's robust PCA, `start=rpca`), then
with calibration data and `solver=linear` the data fit of Yu et al. (CVPR 2017),
min ‖(W − L − S)X‖ on the layer's input patches X (second moments of a sample of them),
started from the weight-only split so it can only do better on the data. `solver=admm`
then runs Ma et al.'s ReLU-aware ADMM (ICTAI 2019), min ½‖relu(WX) − relu((L+S)X)‖², from
that split on layers whose output only feeds a Relu (on a sample of patch_moments.ADMM_ROWS
input rows), and the budget weighs those layers by their ReLU-output error; others keep the
linear fit.
Budgets: `rank` and `sparsity` fix a layer's split; otherwise (rank, kept channels) pairs are
searched and the factorization driver allocates them under `target_macs` by relative error
(on the data when the data solver runs, else on the weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.analyse import analyse
from onnxcompress.errors import CompressError
from onnxcompress.factorization import (
    Candidate,
    DriverOptions,
    Rewrite,
    default_target,
    run_factorization,
)
from onnxcompress.layers import ConvLayer, Namer, named_copy, replace_node
from onnxcompress.linear_layers import LinearLayer, conv_and_linear_layers
from onnxcompress.lowrank_sparse_rewrite import (
    Factors,
    Shape,
    conv_rewrite,
    layer_shape,
    linear_rewrite,
    split_cost,
)
from onnxcompress.maths import lowrank_sparse as lowrank_sparse
from onnxcompress.maths import ranks as ranks
from onnxcompress.never_slower import min_speedup_option, never_slower_option
from onnxcompress.passkit import (
    NodeRecord,
    PassContext,
    PassResult,
    option,
    require_at_least_one,
    require_fraction,
)
from onnxcompress.patch_moments import input_moments
from onnxcompress.registry import register

SOLVERS = ("linear", "admm", "weight")
STARTS = ("svd", "rpca")
NO_REFIT = "none: the data solver already fits each layer on the calibration data"


# Without calibration data: the most MACs removed at which lrs's weight-only fit kept every
# shared model within 5 top-1 points (docs/decisions.md#weight-only-default-budgets).
DEFAULT_TARGET = default_target(0.95)


@dataclass(frozen=True)
class LrsOptions:
    rank: int | None = option(None, "rank of L in every layer (default: searched)")
    sparsity: float | None = option(
        None,
        "fraction of S that is zero: input channels (structured) or entries (default: searched)",
    )
    target_macs: float | None = option(
        None,
        f"keep this fraction of the model's MACs ({DEFAULT_TARGET.help()}, unless rank "
        "and sparsity are both given); splits chosen for least total squared error (knapsack)",
    )
    structured: bool = option(
        True, "zero whole input channels of S (real speed); false: single entries (size only)"
    )
    solver: str = option(
        "linear",
        "linear: fit on calibration data when given (Yu et al. 2017); admm: as linear, then "
        "ReLU-aware ADMM (Ma et al. 2019) on layers whose output only feeds a Relu; "
        "weight: weights only",
    )
    start: str = option("svd", "weight-only start: svd (best rank-r L) or rpca (tensorly)")
    iterations: int = option(lowrank_sparse.ITERATIONS, "alternating iterations per split")
    tolerance: float = option(
        1e-3, "stop a split when an iteration lowers its squared error by less than this, relative"
    )
    grid: int = option(6, "at most this many ranks and kept-channel counts tried per layer")
    align: int = option(16, "round ranks and kept channels to multiples of this (ORT speed)")
    never_slower: bool = never_slower_option()
    min_speedup: float = min_speedup_option()
    refit: bool = option(True, f"accepted for the shared interface; lrs has no refit ({NO_REFIT})")

    def __post_init__(self) -> None:
        require_at_least_one(self, ("rank", "align", "iterations", "grid"))
        require_fraction(self, ("target_macs",))
        if self.sparsity is not None and not 0 <= self.sparsity <= 1:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup must be > 0, got {self.min_speedup}")


class LrsMethod:
    def __init__(self, options: LrsOptions, context: PassContext) -> None:
        self.options = options
        self.context = context
        self.moments: dict[str, np.ndarray] = {}
        self.samples: dict[str, np.ndarray] = {}  # input rows of ReLU-fed layers (admm)

    def layers(self, model: onnx.ModelProto, analysis):
        layers, skips = conv_and_linear_layers(model, analysis)
        usable = [layer for layer in layers if not self.skip_reason(layer)]
        if self.options.solver != "weight" and self.context.calibration and usable:
            relu = _relu_fed(model, usable) if self.options.solver == "admm" else []
            self.moments, self.samples = input_moments(model, usable, self.context, relu)
        return layers, skips

    def skip_reason(self, layer: ConvLayer | LinearLayer) -> str:
        if isinstance(layer, LinearLayer):
            if layer.side == "left":
                return "W @ x (constant on the left): lrs rewrites x @ W only"
            if layer.trans:
                return "Gemm with transA: lrs rewrites untransposed activations only"
        elif layer.group != 1:
            kind = "depthwise" if layer.group == layer.in_channels else "grouped"
            return f"{kind} conv (group={layer.group}): lrs applies to dense convs"
        rank, maximum = self.options.rank, min(layer_shape(layer).matrix.shape)
        if rank is not None and rank > maximum:
            return f"rank={rank} exceeds the layer's maximum rank {maximum}"
        return ""

    def candidates(self, layer: ConvLayer | LinearLayer) -> list[Candidate]:
        shape = layer_shape(layer)
        moment = self.moments.get(layer.name)
        found = []
        for rank in self._ranks(layer, shape):
            previous = None
            for keep in self._keeps(shape):
                cost = split_cost(layer, shape, rank, keep, self.options.structured)
                if self.options.structured and cost["macs"] >= layer.macs and found:
                    continue  # saves nothing: the ladder would drop it (keep one to report)
                previous = self._split(shape, rank, keep, previous)
                fitted = previous
                if moment is not None:
                    fitted = lowrank_sparse.split(
                        shape.matrix, rank, keep, self._groups(shape), moment, previous,
                        self.options.iterations, self.options.tolerance,
                    )  # fmt: skip
                samples = self.samples.get(layer.name)
                if samples is not None:
                    fitted = lowrank_sparse.split_relu_admm(
                        shape.matrix, samples.T, rank, keep, self._groups(shape), fitted,
                        layer.bias,
                    )  # fmt: skip
                found.append(self._candidate(layer, shape, rank, keep, cost, fitted))
        return found

    def _candidate(self, layer, shape, rank, keep, cost, fitted) -> Candidate:
        moment, samples = self.moments.get(layer.name), self.samples.get(layer.name)
        weight_error = lowrank_sparse.relative_error(shape.matrix, fitted)
        error, solver = weight_error, "weight-only"
        config = {}
        if moment is not None:
            error = lowrank_sparse.relative_error(shape.matrix, fitted, moment)
            config["data_rel_error"] = round(error, 6)
            solver = "linear (calibration data)"
        if samples is not None:  # the budget then weighs this layer by its ReLU output error
            error = lowrank_sparse.relu_error(shape.matrix, fitted, samples.T, layer.bias)
            config["relu_rel_error"] = round(error, 6)
            solver = "admm (ReLU-aware, calibration data)"
        config = {
            "rank": rank,
            "sparse_branch": self._branch_text(shape, keep),
            "macs_low_rank": cost["macs_low_rank"],
            "macs_sparse": cost["macs_sparse"],
            "solver": solver,
            "weight_error": round(weight_error, 6),
            **config,
        }
        if not self.options.structured:
            config["sparse_nonzeros"] = int(np.count_nonzero(fitted.sparse))
        return Candidate(
            config, cost["macs"], cost["params"], error, self._factors(shape, fitted, keep)
        )

    def _factors(self, shape: Shape, fitted, keep: int) -> Factors:
        """What `build` needs, compact (every candidate of every layer is held until the
        budget is allocated): S only on its kept channels, in the layer's dtype."""
        dtype = shape.matrix.dtype
        kept, sparse = None, fitted.sparse
        if self.options.structured:
            kept = lowrank_sparse.kept_groups(fitted.sparse, shape.groups, keep)
            sparse = sparse[:, np.isin(shape.groups, kept)]
        return Factors(
            fitted.left.astype(dtype), fitted.right.astype(dtype), sparse.astype(dtype), kept
        )

    def _branch_text(self, shape: Shape, keep: int) -> str:
        if not self.options.structured:
            return f"unstructured: size only ({keep} of {shape.matrix.size} entries kept)"
        return f"structured: {keep} of {shape.channels} input channels"

    def _split(self, shape, rank, keep, previous) -> lowrank_sparse.Split:
        groups = self._groups(shape)
        if previous is None and self.options.start == "rpca":
            previous = lowrank_sparse.robust_pca_start(shape.matrix, rank, keep, groups)
        return lowrank_sparse.split(
            shape.matrix,
            rank,
            keep,
            groups,
            start=previous,
            iterations=self.options.iterations,
            tolerance=self.options.tolerance,
        )

    def _groups(self, shape: Shape) -> np.ndarray | None:
        return shape.groups if self.options.structured else None

    def _ranks(self, layer, shape: Shape) -> list[int]:
        if self.options.rank:
            return [self.options.rank]
        choices = ranks.aligned_ranks(self.options.align, min(shape.matrix.shape))
        affordable = [
            r for r in choices if split_cost(layer, shape, r, 0, True)["macs"] < layer.macs
        ]
        return ranks.spread(affordable or choices[:1], self.options.grid)

    def _keeps(self, shape: Shape) -> list[int]:
        """Kept channels (structured) or entries, most first (each split warm-starts the next)."""
        size = shape.channels if self.options.structured else shape.matrix.size
        if self.options.sparsity is not None:
            return [int(round((1 - self.options.sparsity) * size))]
        choices = [0, *ranks.aligned_ranks(self.options.align, shape.channels)]
        return ranks.spread(choices, self.options.grid)[::-1]

    def build(self, layer, candidate: Candidate, namer: Namer) -> Rewrite:
        if isinstance(layer, ConvLayer):
            return conv_rewrite(layer, candidate.factors, namer)
        return linear_rewrite(layer, candidate.factors, namer)


def _relu_fed(model: onnx.ModelProto, layers: list) -> list[str]:
    """Layers whose output is read by one node only, a Relu (the ADMM's activation)."""
    users = graph.consumers(model)
    outputs = {out.name for out in model.graph.output}
    names = []
    for layer in layers:
        readers = users.get(layer.node.output[0], [])
        out = layer.node.output[0]
        if len(readers) == 1 and readers[0].op_type == "Relu" and out not in outputs:
            names.append(layer.name)
    return names


def _run_unstructured(model, method: LrsMethod, context: PassContext) -> PassResult:
    """Explicit rank and sparsity, no MAC budget, no timing: an unstructured S never saves
    MACs or time on onnxruntime (it is stored dense), only size once compressed."""
    model = named_copy(model)
    analysis = analyse(model, context.input_shapes)
    layers, records = method.layers(model, analysis)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    namer = Namer(rewritten)
    for layer in layers:
        reason = method.skip_reason(layer)
        if reason:
            records.append(NodeRecord(layer.name, layer.node.op_type, "skipped", reason))
            continue
        (candidate,) = method.candidates(layer)
        rewrite = method.build(layer, candidate, namer)
        replace_node(rewritten, layer.name, rewrite.nodes, rewrite.initializers)
        shape = layer_shape(layer)
        records.append(
            NodeRecord(
                layer.name,
                layer.node.op_type,
                "rewritten",
                params_before=shape.matrix.size + (0 if layer.bias is None else layer.bias.size),
                params_after=candidate.params,
                macs_before=layer.macs,
                macs_after=candidate.macs,
                details=dict(candidate.config),
            )
        )
    changed = any(r.status == "rewritten" for r in records)
    summary = {"macs_before": analysis.total_macs}
    summary["macs_after"] = analyse(rewritten, context.input_shapes).total_macs
    return PassResult(rewritten if changed else model, changed, records, summary)


@register(
    "lrs", LrsOptions, "low-rank + sparse: W ≈ L + S, two branches summed (Yu 2017)", lossy=True
)
def lrs(model: onnx.ModelProto, options: LrsOptions, context: PassContext) -> PassResult:
    explicit = options.rank is not None and options.sparsity is not None
    method = LrsMethod(options, context)
    if not options.structured:
        if not explicit or options.target_macs is not None:
            raise CompressError(
                "lrs structured=false saves size, never MACs: give rank and sparsity, "
                "and no target_macs"
            )
        result = _run_unstructured(model, method, context)
    else:
        driver = DriverOptions.for_pass(options, explicit, DEFAULT_TARGET, context, "lrs")
        driver = dataclasses.replace(driver, refit=False)
        result = run_factorization(model, method, driver, context, "lrs")
    result.summary["refit"] = NO_REFIT if method.moments else "none (weight-only fit)"
    result.summary["error_basis"] = (
        "calibration data (input patch second moments)" if method.moments else "weights"
    )
    if method.samples:
        result.summary["error_basis"] += (
            f"; ReLU outputs for the {len(method.samples)} ReLU-fed layers (admm)"
        )
    result.summary["sparse_branch"] = (
        "structured: whole input channels dropped (Gather + smaller dense branch: real MACs)"
        if options.structured
        else "unstructured: size only (S stored dense; no MAC or time saving on onnxruntime)"
    )
    for record in result.records:  # the driver names candidate.error the weight error
        if "weight_error" in record.details:
            record.details["weight_rel_error"] = record.details.pop("weight_error")
    rewritten = [r.details for r in result.records if r.status == "rewritten"]
    result.summary["macs_low_rank"] = sum(d["macs_low_rank"] for d in rewritten)
    result.summary["macs_sparse"] = sum(d["macs_sparse"] for d in rewritten)
    return result
