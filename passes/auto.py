"""`auto`: choose, per layer, between keeping it and each factorization method at a ladder of
ranks, under one global budget (latency, MACs or bytes), from measured costs and damage.

Cost: each candidate rewrite timed alone against its layer in onnxruntime on the layer's real
input shape (persistent cache: a second run times nothing it has seen). Damage: the model's
output error on calibration data when only that layer is replaced and refit (weight error
without data). The allocator picks one option per layer with the least total damage within
the budget; the plan is built, refit in graph order and checked as a whole: the measured
latency (the budget's part spent on layers is tightened and the plan re-solved when the whole
model misses a latency target) and, with a tolerance, the output error (the most damaging
layers are restored until it holds). Channel pruning is not a candidate: removing a channel
changes the layers coupled to it, so its damage is not one layer's."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxcompress.auto import checks as auto_checks
from onnxcompress.auto import sample_budget
from onnxcompress.auto import search as auto_search
from onnxcompress.auto import summary as auto_summary
from onnxcompress.auto.candidates import layer_choices, method_layers
from onnxcompress.auto.settings import SearchSettings
from onnxcompress.errors import CompressError
from onnxcompress.factorization import CLIFF_ERROR
from onnxcompress.layers import named_copy
from onnxcompress.passkit import NodeRecord, PassContext, PassResult, comma_list, option
from onnxcompress.registry import register

log = logging.getLogger(__name__)

METHODS = ("svd", "cp", "tucker2", "fga", "lrs")
DEFAULT_METHODS = "svd,cp,tucker2,fga"
DEFAULT_TARGET_LATENCY = 0.5


@dataclass(frozen=True)
class AutoOptions:
    target_latency: float | None = option(
        None,
        f"keep this fraction of the model's measured latency (default {DEFAULT_TARGET_LATENCY} "
        "when no other target is given)",
    )
    target_macs: float | None = option(None, "keep this fraction of the model's MACs")
    target_bytes: float | None = option(None, "keep this fraction of the model's weight bytes")
    max_rel_l2: float | None = option(
        None, "whole-model check: back off (restore layers) until the outputs' relative L2 on "
        "the calibration data is within this"
    )  # fmt: skip
    max_accuracy_drop: float | None = option(
        None, "whole-model check in top-1 points on the calibration data: accuracy with labels, "
        "else agreement with the original's predictions"
    )  # fmt: skip
    methods: str = option(DEFAULT_METHODS, f"candidate methods, from {', '.join(METHODS)}")
    align: int = option(8, "rank alignment of every method's candidates")
    sensitivity_samples: int | None = option(
        None,
        "calibration samples each sensitivity run uses (default 64; for dense outputs, "
        "fewer, down to 16: as many as hold 262,144 output values)",
    )
    jobs: int | None = option(None, "parallel processes for the sensitivity runs (default --jobs)")
    refit: bool = option(True, "refit the last factors of the plan on calibration data")
    int8: bool | None = option(
        None,
        "also measure the original and the best float plan quantized to int8 (static QDQ), "
        "then plans chosen on the layers' int8 timings, quantized; keep whichever is on target "
        "with the least error (default: on when it can be measured, with a latency target "
        "and calibration data; false: float plans only)",
    )
    blocks: bool | None = option(
        None,
        "also measure the model with whole identity residual blocks removed, the least "
        "damaging first and the layers after them refit, in float and int8, as rounds of the "
        "search (fewer ops: what per-layer plans cannot give where the per-op cost dominates); "
        "kept when on target with the least error (default: on with a latency target and "
        "calibration data, for models that have such blocks; false: never)",
    )
    upcast: bool | None = option(
        None,
        "a float16 model is searched in float32 (the `upcast` pass first: onnxruntime's CPU "
        "kernels and its int8 quantizer want float32), the target scaled by the upcast's "
        "measured latency (default: on for a latency target; false: search the float16 model)",
    )
    latency_basis: str = option(
        "layer",
        "layer: time the layer alone against its rewrite (net of one call's fixed cost); "
        "graph: what the whole model saves with only that layer replaced — measured worse on "
        "ResNet-20 at batch 1, where a layer's saving is within the model's timing noise",
    )

    def __post_init__(self) -> None:
        targets = [
            t for t in (self.target_latency, self.target_macs, self.target_bytes) if t is not None
        ]
        if len(targets) > 1:
            raise ValueError("give one of target_latency, target_macs, target_bytes")
        for value in targets:
            if not 0 < value <= 1:
                raise ValueError(f"targets are fractions in (0, 1], got {value}")
        for name in ("max_rel_l2", "max_accuracy_drop"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        unknown = sorted(set(self.method_names()) - set(METHODS))
        if unknown or not self.method_names():
            raise ValueError(f"methods: unknown {', '.join(unknown) or '(none given)'}")
        if self.latency_basis not in ("graph", "layer"):
            raise ValueError(f"latency_basis must be graph or layer, got {self.latency_basis!r}")
        for name in ("align", "sensitivity_samples", "jobs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def method_names(self) -> list[str]:
        return comma_list(self.methods)

    def wants_int8(self, context: PassContext) -> bool:
        """int8 is tried when asked, and by default wherever it can be measured, as it lost
        less at half the latency (see docs/decisions.md#autooptionsint8)."""
        if self.int8 is not None:
            return self.int8
        return self.budget()[0] == "latency" and bool(context.calibration)

    def wants_blocks(self, context: PassContext) -> bool:
        """Block removal is tried by default where it can be measured, as int8 is."""
        if self.blocks is not None:
            return self.blocks and bool(context.calibration)
        return self.budget()[0] == "latency" and bool(context.calibration)

    def search_settings(self, context: PassContext) -> SearchSettings:
        """What the search is told: the budget, the candidates and the tolerance, with the
        defaults that depend on the run (jobs, blocks) resolved."""
        kind, target = self.budget()
        return SearchSettings(
            kind=kind,
            target=target,
            methods=tuple(self.method_names()),
            align=self.align,
            sensitivity_samples=self.sensitivity_samples or sample_budget.DEFAULT_SAMPLES,
            jobs=self.jobs or context.jobs,
            refit=self.refit,
            max_rel_l2=self.max_rel_l2,
            max_accuracy_drop=self.max_accuracy_drop,
            latency_basis=self.latency_basis,
            blocks=self.wants_blocks(context),
        )

    def wants_upcast(self, model: onnx.ModelProto) -> bool:
        from onnxcompress.passes.upcast import computes_in_float16

        if self.upcast is False or not computes_in_float16(model):
            return False
        return self.upcast or self.budget()[0] == "latency"

    def effective(self, model: onnx.ModelProto, context: PassContext) -> dict[str, Any]:
        """The options left unset that this run gave a value, as it resolved them (the
        report lists them with the options)."""
        kind, target = self.budget()
        return {
            f"target_{kind}": target,
            "jobs": self.jobs or context.jobs,
            "int8": self.wants_int8(context),
            "blocks": self.wants_blocks(context),
            "upcast": self.wants_upcast(model),
        }

    def budget(self) -> tuple[str, float]:
        if self.target_macs is not None:
            return "macs", self.target_macs
        if self.target_bytes is not None:
            return "bytes", self.target_bytes
        if self.target_latency is not None:
            return "latency", self.target_latency
        return "latency", DEFAULT_TARGET_LATENCY


def make_methods(factory_options: dict[str, Any], context: PassContext) -> dict[str, Any]:
    """The candidate methods, configured as their passes would be for a budget run (never
    timed or refit by their own driver: auto does both). Importable by worker processes."""
    from onnxcompress.passes import cp, fga, lrs, svd, tucker2

    align = factory_options["align"]
    data = bool(context.calibration)
    build = {
        "svd": lambda: svd.SvdMethod(_options(svd.SvdOptions, align), refit_data=data),
        "cp": lambda: cp.CpMethod(_options(cp.CpOptions, align)),
        "tucker2": lambda: tucker2.Tucker2Method(_options(tucker2.Tucker2Options, align)),
        "fga": lambda: fga.FgaMethod(_options(fga.FgaOptions, align)),
        "lrs": lambda: lrs.LrsMethod(_options(lrs.LrsOptions, align), context),
    }
    return {name: build[name]() for name in factory_options["methods"]}


def _options(kind: type, align: int) -> Any:
    return kind(**{"align": align} if "align" in {f.name for f in dataclasses.fields(kind)} else {})


@register(
    "auto",
    AutoOptions,
    "per layer: keep, svd, cp, tucker2, fga or lrs, by measured cost",
    lossy=True,
)
def auto(model: onnx.ModelProto, options: AutoOptions, context: PassContext) -> PassResult:
    model = named_copy(model)
    effective = options.effective(model, context)  # before the upcast rescales the target
    upcast = None
    if options.wants_upcast(model):
        model, options, upcast = _upcast_first(model, options, context)
    from onnxcompress.analyse import analyse

    analysis = analyse(model, context.input_shapes)
    factory_options = {"methods": options.method_names(), "align": options.align}
    methods = make_methods(factory_options, context)
    choices, skipped = layer_choices(model, methods, method_layers(model, analysis, methods))
    op_of = {stats.name: stats.op for stats in analysis.nodes}
    records = [
        NodeRecord(name, op_of.get(name, "?"), "skipped", reason)
        for name, reason in skipped.items()
    ]
    if not choices:
        raise CompressError("auto: no layer any candidate method can rewrite to save MACs")
    quantize = quantize_layer = None
    if options.wants_int8(context):
        from onnxcompress.passes import int8

        # upcast=false asks for the float16 model as given: int8 must not upcast it either.
        int8_upcast = options.upcast is not False

        def quantize(source: onnx.ModelProto, keep: list[str] = ()) -> onnx.ModelProto:
            # `keep`: nodes left in float (layers whose int8 kernel is slower, and the ops
            # up to the next layers: `graph.float_region`).
            # Its own rounds time the whole model: no per-layer timing for the report here.
            options = int8.Int8Options(keep=",".join(keep), upcast=int8_upcast, time_layers=False)
            return int8.int8(source, options, context).model

        def quantize_layer(source: onnx.ModelProto, feeds: dict) -> onnx.ModelProto:
            # For timing only: ranges from the timing input are as good as any. A layer the
            # quantizer cannot take alone (a broadcast bias, say) is timed in float.
            shapes = {name: list(value.shape) for name, value in feeds.items()}
            alone = PassContext(shapes, calibration=[feeds], threads=context.threads)
            try:
                options = int8.Int8Options(upcast=int8_upcast, time_layers=False)
                return int8.int8(source, options, alone).model
            except CompressError as exc:
                log.debug("auto: int8 timing of a layer in float: %s", exc)
                return source

    settings, budget = _sensitivity_settings(model, analysis, options, context)
    if budget is not None:
        effective["sensitivity_samples"] = settings.sensitivity_samples
    found = auto_search.search(
        model,
        analysis,
        choices,
        methods,
        settings,
        context,
        quantize,
        quantize_layer,
        factory=f"{__name__}:{make_methods.__name__}",
    )
    records += found.records
    if budget is not None:
        found.summary["sensitivity"]["default"] = budget
    if found.summary.get("int8", {}).get("quantized"):
        auto_summary.mark_precision(records, found.summary, found.model)
    summary = {"auto": found.summary, "effective_options": effective}
    if upcast:
        found.summary["upcast"] = upcast
        summary["notes"] = [upcast["note"]]
    warning = plan_warning(found.summary)
    if warning:
        summary["note"] = warning
    return PassResult(found.model, found.changed or bool(upcast), records, summary)


def _sensitivity_settings(model, analysis, options: AutoOptions, context: PassContext):
    """The search's settings, `sensitivity_samples` left unset resolved for this model
    (`sample_budget`), and what the report says of that (None when the user set it)."""
    settings = options.search_settings(context)
    if options.sensitivity_samples is not None:
        return settings, None
    values = sample_budget.values_per_sample(model, analysis)
    samples = sample_budget.default_samples(values)
    resolved = dataclasses.replace(settings, sensitivity_samples=samples)
    return resolved, sample_budget.summary(values, samples)


def _upcast_first(model, options: AutoOptions, context: PassContext):
    """The float32 upcast of a float16 model, the options with a latency or bytes target
    scaled to it (target / the upcast's measured ratio: the user's target is of the file
    given), and what was done. int8 of the upcast runs far faster than int8 of the float16
    file (see docs/decisions.md#autooptionsupcast)."""
    from onnxcompress.passes import upcast

    upcast_model = upcast.upcast(model, upcast.UpcastOptions(), context).model
    done: dict[str, Any] = {"from": "float16", "to": "float32"}
    kind, target = options.budget()
    if kind in ("latency", "bytes"):
        ratio = _upcast_ratio(kind, model, upcast_model, context)
        scaled = min(1.0, round(target / ratio, 4))
        done.update({f"{kind}_ratio": ratio, "target_given": target, "target": scaled})
        options = dataclasses.replace(options, **{f"target_{kind}": scaled})
    done["note"] = _upcast_note(done)
    return upcast_model, options, done


def _upcast_note(done: dict[str, Any]) -> str:
    note = "searched on the float32 upcast of this float16 model"
    for kind in ("latency", "bytes"):
        if f"{kind}_ratio" in done:
            note += (
                f": target {done['target_given']:g} of the model given is {done['target']:g} of "
                f"the upcast, whose {kind} is {done[f'{kind}_ratio']:g} of the model's"
            )
    return note


def _upcast_ratio(kind: str, model, upcast_model, context: PassContext) -> float:
    """The upcast's latency (measured) or weight bytes over the float16 model's."""
    if kind == "latency":
        return auto_checks.latency_ratio(model, upcast_model, context)
    from onnxcompress.graph import weight_bytes

    return weight_bytes(upcast_model) / weight_bytes(model)


def plan_warning(found: dict) -> str:
    """What the user must hear about the kept plan: a missed latency target, faster plans
    passed over because they broke the outputs, outputs far from the original's."""
    warnings, model = [], found.get("model", {})
    missed = found.get("target_reached") is False
    # Faster broken plans matter only when the kept one is off target (the report lists them).
    broken = found.get("broken_faster") if missed else None
    if missed:
        which = "the kept plan" if broken else "the fastest plan"
        warnings.append(
            f"target_latency={found['budget']['target']:g} missed: {which} measured "
            f"{model.get('latency_ratio', float('nan')):.3f} of the original's latency"
        )
    if broken:
        warnings.append(
            f"faster plans break the outputs (the fastest: {broken['latency_ratio']:.3f} at "
            f"relative L2 {broken['rel_l2']:.2f} > {CLIFF_ERROR}); set max_rel_l2 to accept one"
        )
    unsteady = _unsteady_timing(model.get("latency_windows") or [])
    if unsteady:
        warnings.append(unsteady)
    # The factorization driver's level for a layer's error, here for the whole model's outputs;
    # see docs/decisions.md#cliff_error
    if model.get("rel_l2", 0.0) > CLIFF_ERROR:
        warnings.append(
            f"the outputs are {model['rel_l2']:.2f} away from the original's (relative L2 on "
            "the calibration data): expect a large accuracy drop; set max_rel_l2 or "
            "max_accuracy_drop, or ask for less"
        )
    return "; ".join(warnings)


# Windows of one plan further apart than this, over their median, make its ratio uncertain;
# see docs/decisions.md#unsteady_spread
UNSTEADY_SPREAD = 0.1


def _unsteady_timing(windows: list[float]) -> str:
    """What the user must hear when the kept plan's timing windows disagree."""
    if len(windows) < 2:
        return ""
    low, high = min(windows), max(windows)
    if (high - low) / float(np.median(windows)) <= UNSTEADY_SPREAD:
        return ""
    return (
        f"the kept plan's timing windows ranged {low:.3f}-{high:.3f} of the original's "
        "latency: the machine's speed moved while it was timed, re-measure before relying "
        "on the ratio"
    )
