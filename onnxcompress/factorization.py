"""The driver every factorization pass shares: find layers, choose a rank per layer (explicit,
by energy, or under a global MACs budget: mac_budget), rewrite, time each layer and revert what
is not faster (never_slower), then refit the last factors on calibration data. A pass supplies
a `Method`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx

from onnxcompress import activation_scale, graph, layer_refit, model_copies, output_sensitivity
from onnxcompress.analyse import ModelAnalysis, analyse
from onnxcompress.default_budget import DefaultBudget
from onnxcompress.errors import CompressError
from onnxcompress.input_checks import require_finite_weights
from onnxcompress.keep_rule import kept_layers
from onnxcompress.layer_plan import (  # noqa: F401  (CLIFF_ERROR, pareto_ladder re-exported)
    CLIFF_ERROR,
    COLLAPSE_REL_L2,
    RESOLVE_ROUNDS,
    Plan,
    pareto_ladder,
    plan_layers,
    skip_record,
    solve_again,
    warn_past_the_cliff,
)
from onnxcompress.layer_roles import last_weighted_layer
from onnxcompress.layers import Namer, conv_layers, conv_node, named, replace_node
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


# The budget a factorization pass uses with calibration data when its options fix no rank and
# no energy; without data each pass has its own, measured (default_budget).
DEFAULT_TARGET_MACS = 0.5


def default_target(weight_only: float | None) -> DefaultBudget:
    """A factorization pass's default target_macs: DEFAULT_TARGET_MACS with calibration data,
    `weight_only` without (None: no default, the pass refuses)."""
    return DefaultBudget("target_macs", DEFAULT_TARGET_MACS, weight_only)


# An option of the passes that can fit on whitened inputs (activation_scale).
def activation_aware_option() -> Any:
    return option(
        False,
        "with calibration data, factorize W·T (T: input whitening from the data) and allocate "
        "ranks by that data error instead of weight error; off by default: measured worse on "
        "ResNet-20 for every pass and on MiniLM svd, better for svd on SqueezeNet "
        "(docs/decisions.md#activation_aware)",
    )


def relu_aware_option() -> Any:
    return option(
        True,
        "with refit, refine the last factor of a layer whose output goes only into a Relu so "
        "that relu(output) matches, kept where it does better on held-out samples",
    )


ALLOCATIONS = ("output", "layer")


def allocation_option() -> Any:
    return option(
        "layer",
        "how a MAC budget weighs each layer's error: 'layer' by the layer's own relative error; "
        "'output' (with calibration data) by its measured effect on the model's outputs, one "
        "probe forward pass per layer (measured worse on ResNet-20 and MiniLM)",
    )


def keep_option() -> Any:
    return option(
        "classifier",
        "layers left as they are, comma-separated: classifier (the model's last weighted "
        "layer, unless it is the only one the pass can take), first, last (the pass's layers "
        "in graph order), fnmatch patterns on node names; none keeps nothing",
    )


def keep_collapsing_option() -> Any:
    return option(
        True,
        "with calibration data and a MAC budget, keep every layer whose rewrite alone (at its "
        f"share of the budget, refitted) moves the model's outputs by relative L2 ≥ "
        f"{COLLAPSE_REL_L2}; false: rewrite them too",
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
    relu_aware: bool = True
    activation_aware: bool = False
    allocation: str = "layer"
    keep_collapsing: bool = True
    keep: str | None = None
    default_target: bool = False  # target_macs is the pass's default, not the user's
    default_note: str = ""  # which default, and why (with or without calibration data)

    @classmethod
    def for_pass(
        cls,
        options: Any,
        explicit: bool,
        default: DefaultBudget,
        context: PassContext,
        pass_name: str,
    ) -> DriverOptions:
        """From a pass's options; `explicit`: they already fix the ranks (no default budget).
        Otherwise `default` gives the target, by whether the run has calibration data."""
        energy = getattr(options, "energy", None)
        allocation = getattr(options, "allocation", "layer")
        if allocation not in ALLOCATIONS:
            raise CompressError(f"allocation={allocation!r}: expected one of {ALLOCATIONS}")
        target, note = options.target_macs, ""
        if target is None and not explicit and energy is None:
            target, note = default.choose(bool(context.calibration), pass_name)
        return cls(
            target_macs=target,
            energy=energy,
            never_slower=options.never_slower,
            min_speedup=options.min_speedup,
            refit=options.refit,
            relu_aware=getattr(options, "relu_aware", True),
            activation_aware=getattr(options, "activation_aware", False),
            allocation=allocation,
            keep_collapsing=getattr(options, "keep_collapsing", True),
            keep=getattr(options, "keep", None),
            default_target=options.target_macs is None and target is not None,
            default_note=note,
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


def run_factorization(
    model: onnx.ModelProto,
    method: Method,
    options: DriverOptions,
    context: PassContext,
    pass_name: str,
) -> PassResult:
    """Apply `method` to every layer it can take, as `options` and the budget say."""
    result = _factorize(named(model), method, options, context, pass_name)
    if not result.changed:  # the model given, not its named copy (the pass contract)
        result.model = model
    return result


def _factorize(model, method: Method, options: DriverOptions, context, pass_name) -> PassResult:
    analysis = analyse(model, context.input_shapes)
    layers, skipped = method.layers(model, analysis)
    layers, kept = _split_kept(model, layers, options.keep, f"{pass_name}.keep")
    skipped += kept
    require_finite_weights(decomposed_weights(layers, method), pass_name)
    transforms = _input_transforms(model, layers, method, options, context)
    layers = [
        activation_scale.transformed_layer(x, transforms[x.name]) if transforms else x
        for x in layers
    ]

    def restored(layer, rewrite):
        """The rewrite reading the real input again when the layer was fitted whitened."""
        if transforms:
            x = activation_scale.activation_of(layer)
            activation_scale.restore_inputs(
                rewrite.nodes, rewrite.initializers, x, transforms[layer.name]
            )
        return rewrite

    def build(layer, candidate, namer):
        return restored(layer, method.build(layer, candidate, namer))

    def probe(choices):
        if not context.calibration or not choices:
            return {}
        return output_sensitivity.probe_layers(
            model, choices, build, options.target_macs, context, options.refit
        )

    plan = plan_layers(layers, method, options, analysis, probe)
    plan.records[:0] = skipped
    if options.default_note:
        plan.summary["notes"] = [options.default_note]
    plan.summary["error_basis"] = (
        f"calibration data ({_whitening_kind(method)} input whitening)" if transforms else "weights"
    )
    if not plan.chosen():
        plan.settle(set())
        return PassResult(model, False, plan.records, plan.summary)
    chosen, built, namer = plan.chosen(), {}, Namer(model)
    if options.never_slower:
        chosen, reverted = _fast_plan(model, plan, method, namer, built, options, context)
        plan.records += reverted
        if not chosen:  # every layer would be slower: hand back the model as it came
            plan.settle({r.node for r in reverted})
            return _finish(model, model, {}, plan, options, context, analysis, pass_name)
    else:
        plan.settle(set())
    rewritten = model_copies.copy_without_initializers(model, _read_only_by(model, chosen))
    rewrites = {}
    for layer, candidate in chosen:
        rewrite = built.get(id(candidate))  # faster_only built it with the method alone
        rewrite = build(layer, candidate, namer) if rewrite is None else restored(layer, rewrite)
        replace_node(rewritten, layer.name, rewrite.nodes, rewrite.initializers)
        rewrites[layer.name] = (layer, candidate, rewrite)
    return _finish(model, rewritten, rewrites, plan, options, context, analysis, pass_name)


def _read_only_by(model, chosen) -> set[str]:
    """Initializers that only the rewritten layers read: the copy that gets the rewrites
    leaves them out (copied, they would be dropped at cleanup, after doubling memory)."""
    replaced = {layer.name for layer, _ in chosen}
    readers = graph.consumers(model)
    weights = {init.name for init in model.graph.initializer}
    return {
        name
        for name in weights
        if readers.get(name) and all(node.name in replaced for node in readers[name])
    }


def _fast_plan(model, plan: Plan, method, namer, built: dict, options: DriverOptions, context):
    """The plan's rewrites that are faster than the original layers, and a record for each
    layer put back; with a MAC budget, solved again among the layers that stay fast."""
    slow: list[NodeRecord] = []
    chosen = plan.chosen()
    for round_ in range(RESOLVE_ROUNDS + 1):
        untimed = [(layer, c) for layer, c in chosen if "timing" not in c.config]
        _, reverted = faster_only(
            model, untimed, method, namer, built, options.min_speedup, context
        )
        slow += reverted
        last = round_ == RESOLVE_ROUNDS  # a solve now would leave its new rungs untimed
        if not reverted or options.target_macs is None or last:
            break
        if not solve_again(plan, {r.node for r in slow}, options):
            break
        chosen = plan.chosen()
    names = {r.node for r in slow}
    plan.settle(names)
    return [(layer, c) for layer, c in plan.chosen() if layer.name not in names], slow


def _split_kept(model, layers: list, keep: str | None, option_name: str) -> tuple[list, list]:
    """(layers the pass may rewrite, a skip record for each one `keep` names)."""
    if keep is None:
        return layers, []
    names = [layer.name for layer in layers]
    kept = kept_layers(names, keep, option_name, last_weighted_layer(model))
    records = [skip_record(layers[i], f"kept: {why}") for i, why in sorted(kept.items())]
    return [layer for i, layer in enumerate(layers) if i not in kept], records


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
            model,
            rewritten,
            [r.refit for _, _, r in rewrites.values() if r.refit],
            context,
            options.relu_aware,
        )
    else:
        plan.summary["refit"] = "weight-only (no calibration data)" if options.refit else "off"
    _record_rewrites(rewrites, plan)
    plan.summary["macs_after"] = analyse(rewritten, context.input_shapes).total_macs
    plan.summary["macs_ratio"] = plan.summary["macs_after"] / max(1, analysis.total_macs)
    if options.target_macs is not None:
        errors = [candidate.error for _, candidate, _ in rewrites.values()]
        warn_past_the_cliff(errors, len(plan.choices), plan.summary)
    check_target_after_reverts(plan.summary, plan.records)
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


def _record_rewrites(rewrites: dict, plan: Plan) -> None:
    for name, (layer, candidate, rewrite) in rewrites.items():
        params_before = layer.weight.size + (layer.bias.size if layer.bias is not None else 0)
        details = {**candidate.config, "weight_rel_error": round(candidate.error, 6)}
        if name in plan.probes:  # the probe's rung, alone
            details["probe_output_rel_l2"] = round(plan.probes[name].output_rel_l2, 4)
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
