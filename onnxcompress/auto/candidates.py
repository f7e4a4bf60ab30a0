"""The candidates `auto` weighs for each layer: every method that can take the layer, at a
short ladder of ranks spread over how much of the layer's MACs they keep. Candidates come
from the factorization methods themselves (their own rank rules and alignment), so what
`auto` measures is exactly what the single-method passes would write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from onnxcompress.analyse import ModelAnalysis
from onnxcompress.factorization import Candidate, pareto_ladder

# Fractions of a layer's MACs the ladder aims at: from a light touch to a deep cut.
RUNG_FRACTIONS = (0.75, 0.55, 0.4, 0.28, 0.18, 0.1)


@dataclass
class LayerCandidate:
    """One way to rewrite one layer with one method."""

    layer: str
    method: str
    candidate: Candidate
    key: str = ""  # method and config, e.g. "svd form=spatial rank=16"

    def __post_init__(self) -> None:
        # Fixed now: building a rewrite may add notes to the candidate's config.
        parts = [f"{k}={v}" for k, v in sorted(self.candidate.config.items()) if _short(v)]
        self.key = " ".join([self.method, *parts])


@dataclass
class LayerChoices:
    """A layer auto may rewrite: the layer object of each method that takes it, the original
    layer's MACs and parameters, and its candidates."""

    name: str
    op: str
    macs: int
    params: int
    layers: dict[str, Any]  # method name -> that method's layer object
    candidates: list[LayerCandidate]


def method_layers(
    model: onnx.ModelProto, analysis: ModelAnalysis, methods: dict[str, Any]
) -> dict[str, tuple[list, list]]:
    """Each method's (layers, skip records) — computed once, some methods fit data here."""
    return {name: method.layers(model, analysis) for name, method in methods.items()}


def layer_choices(
    model: onnx.ModelProto,
    methods: dict[str, Any],
    layers_by_method: dict[str, tuple[list, list]],
    fractions: tuple[float, ...] = RUNG_FRACTIONS,
    only: str | None = None,
) -> tuple[list[LayerChoices], dict[str, str]]:
    """Layers in graph order with their candidates (just layer `only`, if given), and why
    every other layer that some method looked at has none: {layer: reason}."""
    found: dict[str, LayerChoices] = {}
    reasons: dict[str, list[str]] = {}
    for method_name, method in methods.items():
        layers, skipped = layers_by_method[method_name]
        for record in skipped:
            reasons.setdefault(record.node, []).append(f"{method_name}: {record.reason}")
        for layer in layers:
            if only is not None and layer.name != only:
                continue
            reason = method.skip_reason(layer)
            ladder = [] if reason else pareto_ladder(method.candidates(layer), layer.macs)
            if not ladder:
                reasons.setdefault(layer.name, []).append(
                    f"{method_name}: {reason or 'no rank saves MACs'}"
                )
                continue
            entry = found.setdefault(layer.name, _entry(layer))
            entry.layers[method_name] = layer
            entry.candidates += [
                LayerCandidate(layer.name, method_name, c)
                for c in rungs(ladder, layer.macs, fractions)
            ]
    order = {node.name: i for i, node in enumerate(model.graph.node)}
    choices = sorted(found.values(), key=lambda entry: order[entry.name])
    skipped = {name: "; ".join(why) for name, why in reasons.items() if name not in found}
    return choices, skipped


def rungs(ladder: list[Candidate], layer_macs: int, fractions) -> list[Candidate]:
    """The ladder's candidates nearest to each fraction of the layer's MACs (no repeats),
    most MACs first."""
    picked: list[Candidate] = []
    for fraction in fractions:
        nearest = min(ladder, key=lambda c: abs(c.macs - fraction * layer_macs))
        if all(nearest is not other for other in picked):
            picked.append(nearest)
    return sorted(picked, key=lambda c: -c.macs)


def _entry(layer: Any) -> LayerChoices:
    params = layer.weight.size + (layer.bias.size if layer.bias is not None else 0)
    return LayerChoices(layer.name, layer.node.op_type, layer.macs, int(params), {}, [])


def _short(value: Any) -> bool:
    """Config values worth showing in a label (not notes or timing dicts)."""
    return isinstance(value, int | float) or (isinstance(value, str) and len(value) <= 16)
