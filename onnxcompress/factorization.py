"""The driver every factorization pass shares: find layers, choose a rank per layer (explicit,
by energy, or under a global MACs budget: mac_budget), rewrite, time each layer and revert what
is not faster (never_slower), then refit the last factors on calibration data. A pass supplies
a `Method`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from onnxcompress import activation_scale, layer_refit
from onnxcompress.analyse import ModelAnalysis, analyse
from onnxcompress.errors import CompressError
from onnxcompress.input_checks import require_finite_weights
from onnxcompress.layers import Namer, conv_layers, conv_node, named_copy, replace_node
from onnxcompress.mac_budget import LayerChoice, allocate
from onnxcompress.never_slower import check_target_after_reverts, faster_only
from onnxcompress.passkit import NodeRecord, PassContext, PassResult, option

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One way to rewrite one layer; `error` is the relative (Frobenius) weight error."""

    config: dict[str, Any]
    macs: int
    params: int
    error: float
    factors: Any = None


@dataclass
class Rewrite:
    """The subgraph that replaces a layer; its last node writes the layer's output tensor."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    refit: layer_refit.RefitSite | None = None


class Method(Protocol):
    """What a factorization pass tells the driver about its decomposition."""

    def layers(self, model: onnx.ModelProto, analysis: ModelAnalysis) -> tuple[list, list]:
        """(layers it may rewrite, skip records for the others)."""

    def skip_reason(self, layer: Any) -> str:
        """Why this layer cannot be rewritten by this method ("" if it can)."""

    def candidates(self, layer: Any) -> list[Candidate]:
        """Versions of the layer the pass's explicit options allow (any order)."""

    def build(self, layer: Any, candidate: Candidate, namer: Namer) -> Rewrite:
        """Nodes and initializers for the chosen candidate."""


# The budget a factorization pass uses when its options fix no rank and no energy.
DEFAULT_TARGET_MACS = 0.5


# An option of the passes that can fit on whitened inputs (activation_scale).
def activation_aware_option() -> Any:
    return option(
        False,
        "with calibration data, factorize W·T (T: input whitening from the data) and allocate "
        "ranks by that data error instead of weight error; off by default: measured worse on "
        "ResNet-20 for every pass, better for svd on SqueezeNet (docs/results.md)",
    )


class ConvMethod:
    """Base of the methods that rewrite 2-D Convs only: keeps the options, finds the layers."""

    def __init__(self, options: Any) -> None:
        self.options = options

    def layers(self, model: onnx.ModelProto, analysis: ModelAnalysis) -> tuple[list, list]:
        return conv_layers(model, analysis)


@dataclass(frozen=True)
class DriverOptions:
    """The options every factorization pass shares (each pass re-declares them with help)."""

    target_macs: float | None = None
    energy: float | None = None
    never_slower: bool = True
    min_speedup: float = 1.05
    refit: bool = True
    activation_aware: bool = False
    default_target: bool = False  # target_macs is the pass's default, not the user's

    @classmethod
    def for_pass(cls, options: Any, explicit: bool) -> DriverOptions:
        """From a pass's options; `explicit`: they already fix the ranks (no default budget)."""
        energy = getattr(options, "energy", None)
        target = options.target_macs
        if target is None and not explicit and energy is None:
            target = DEFAULT_TARGET_MACS
        return cls(
            target_macs=target,
            energy=energy,
            never_slower=options.never_slower,
            min_speedup=options.min_speedup,
            refit=options.refit,
            activation_aware=getattr(options, "activation_aware", False),
            default_target=options.target_macs is None and target is not None,
        )


def pointwise_output(
    namer: Namer, layer: Any, x: str, weight: np.ndarray, tag: str
) -> tuple[onnx.NodeProto, list[onnx.TensorProto], layer_refit.RefitSite]:
    """The closing 1×1 Conv of a factorized conv layer: it writes the layer's output tensor,
    carries the bias (zeros if the layer had none, so a refit can set one) and is the refit site."""
    dtype = layer.weight.dtype
    bias = layer.bias if layer.bias is not None else np.zeros(layer.out_channels, dtype)
    node, inits = conv_node(
        namer,
        f"{layer.name}.{tag}",
        x,
        weight.astype(dtype),
        out=layer.node.output[0],
        bias=bias.astype(dtype),
        kernel_shape=[1, 1],
    )
    site = layer_refit.RefitSite(x, layer.node.output[0], node.input[1], node.input[2], "conv1x1")
    return node, inits, site


@dataclass
class _Plan:
    chosen: list[tuple[Any, Candidate]] = field(default_factory=list)
    records: list[NodeRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def run_factorization(
    model: onnx.ModelProto,
    method: Method,
    options: DriverOptions,
    context: PassContext,
    pass_name: str,
) -> PassResult:
    """Apply `method` to every layer it can take, as `options` and the budget say."""
    model = named_copy(model)
    analysis = analyse(model, context.input_shapes)
    layers, skipped = method.layers(model, analysis)
    require_finite_weights(decomposed_weights(layers, method), pass_name)
    transforms = _input_transforms(model, layers, method, options, context)
    layers = [
        activation_scale.transformed_layer(x, transforms[x.name]) if transforms else x
        for x in layers
    ]
    plan = _plan(layers, method, options, analysis)
    plan.records[:0] = skipped
    plan.summary["error_basis"] = (
        f"calibration data ({_whitening_kind(method)} input whitening)" if transforms else "weights"
    )
    if not plan.chosen:
        return PassResult(model, False, plan.records, plan.summary)
    chosen, built, namer = plan.chosen, {}, Namer(model)
    if options.never_slower:
        chosen, reverted = faster_only(
            model, chosen, method, namer, built, options.min_speedup, context
        )
        plan.records += reverted
        if not chosen:  # every layer would be slower: hand back the model as it came
            return _finish(model, model, {}, plan, options, context, analysis, pass_name)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    rewrites = {}
    for layer, candidate in chosen:
        rewrite = built.get(layer.name) or method.build(layer, candidate, namer)
        if transforms:
            x = activation_scale.activation_of(layer)
            activation_scale.restore_inputs(
                rewrite.nodes, rewrite.initializers, x, transforms[layer.name]
            )
        replace_node(rewritten, layer.name, rewrite.nodes, rewrite.initializers)
        rewrites[layer.name] = (layer, candidate, rewrite)
    return _finish(model, rewritten, rewrites, plan, options, context, analysis, pass_name)


def decomposed_weights(layers: list, method: Method):
    """(weight, tensor, node) of each layer `method` would decompose (not those it skips)."""
    for layer in layers:
        if not method.skip_reason(layer):
            activation = getattr(layer, "activation", layer.node.input[0])
            tensor = next(name for name in layer.node.input[:2] if name != activation)
            yield layer.weight, tensor, layer.name


def _finish(model, rewritten, rewrites, plan, options, context, analysis, pass_name):
    """Refit, records and the summary's MACs, for the layers that stayed rewritten."""
    if options.refit and context.calibration and rewrites:
        plan.summary["refit"] = layer_refit.refit_layers(
            model, rewritten, [r.refit for _, _, r in rewrites.values() if r.refit], context
        )
    else:
        plan.summary["refit"] = "weight-only (no calibration data)" if options.refit else "off"
    _record_rewrites(rewrites, plan)
    plan.summary["macs_after"] = analyse(rewritten, context.input_shapes).total_macs
    plan.summary["macs_ratio"] = plan.summary["macs_after"] / max(1, analysis.total_macs)
    check_target_after_reverts(plan.summary, plan.records, analysis.total_macs)
    log.info("%s: %d layers rewritten", pass_name, len(rewrites))
    return PassResult(rewritten, bool(rewrites), plan.records, plan.summary)


def _input_transforms(model, layers, method, options: DriverOptions, context) -> dict:
    """Per-layer input whitening for activation-aware fitting (empty: weight-only)."""
    if not (options.activation_aware and context.calibration and layers):
        return {}
    moments = activation_scale.input_second_moments(model, layers, context)
    diagonal = _whitening_kind(method) == "diagonal"
    return {name: activation_scale.whitening(m, diagonal) for name, m in moments.items()}


def _whitening_kind(method) -> str:
    """Methods whose first factor is a grouped conv (fga) can absorb only a diagonal T."""
    return "diagonal" if getattr(method, "grouped_input", False) else "full"


def _plan(layers, method: Method, options: DriverOptions, analysis: ModelAnalysis) -> _Plan:
    plan = _Plan(summary={"macs_before": analysis.total_macs})
    choices = []
    for layer in layers:
        reason = method.skip_reason(layer)
        ladder = [] if reason else pareto_ladder(method.candidates(layer), layer.macs)
        if not reason and not ladder:
            reason = "no rank saves MACs"
        if not reason and options.energy is not None:
            ladder = _within_energy(ladder, options.energy)
            reason = "" if ladder else f"every rank that saves MACs keeps < {options.energy} energy"
        if reason:
            plan.records.append(
                NodeRecord(
                    layer.name, layer.node.op_type, "skipped", reason, macs_before=layer.macs
                )
            )
            continue
        choices.append(LayerChoice(layer, ladder))
    if options.target_macs is None:
        for choice in choices:  # explicit rank or energy: the cheapest allowed candidate
            choice.index = len(choice.ladder) - 1
    else:
        allocate(choices, options, analysis.total_macs, plan.summary)
        _warn_past_the_cliff(choices, plan.summary)
    for choice in choices:
        if choice.current is None:
            plan.records.append(
                NodeRecord(
                    choice.layer.name,
                    choice.layer.node.op_type,
                    "skipped",
                    "kept: the budget was met without it",
                    macs_before=choice.layer.macs,
                )
            )
        else:
            plan.chosen.append((choice.layer, choice.current))
    return plan


def pareto_ladder(candidates: list[Candidate], layer_macs: int) -> list[Candidate]:
    """Candidates that save MACs and are not beaten on both MACs and error, most MACs first."""
    ladder: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.macs, c.error)):
        if candidate.macs < layer_macs and (not ladder or candidate.error < ladder[-1].error):
            ladder.append(candidate)
    return ladder[::-1]


def _within_energy(ladder: list[Candidate], energy: float) -> list[Candidate]:
    """Keep candidates whose weight keeps at least `energy` of ‖W‖² (error² ≤ 1 − energy)."""
    if not 0 < energy <= 1:
        raise CompressError(f"energy={energy}: expected a fraction in (0, 1]")
    return [c for c in ladder if c.error**2 <= 1 - energy + 1e-12]


# A layer kept with more relative error than this has lost over 3/4 of its (weight or data)
# energy: such plans are far past the point where accuracy holds; the summary says so.
CLIFF_ERROR = 0.5


def _warn_past_the_cliff(choices: list[LayerChoice], summary: dict) -> None:
    over = [c for c in choices if c.current is not None and c.current.error > CLIFF_ERROR]
    if over:
        worst = max(c.current.error for c in over)
        summary["note"] = (
            f"{len(over)} of {len(choices)} layers keep a relative error above {CLIFF_ERROR} "
            f"(worst {worst:.2f}) to meet the budget: expect a large accuracy drop — check the "
            "validation, or ask for fewer MACs removed"
        )


def _record_rewrites(rewrites: dict, plan: _Plan) -> None:
    for name, (layer, candidate, rewrite) in rewrites.items():
        params_before = layer.weight.size + (layer.bias.size if layer.bias is not None else 0)
        details = {**candidate.config, "weight_rel_error": round(candidate.error, 6)}
        if rewrite.refit and rewrite.refit.result:
            details["refit"] = rewrite.refit.result
        plan.records.append(
            NodeRecord(
                name,
                layer.node.op_type,
                "rewritten",
                params_before=params_before,
                params_after=candidate.params,
                macs_before=layer.macs,
                macs_after=candidate.macs,
                details=details,
            )
        )
