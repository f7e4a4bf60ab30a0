"""`auto`'s plan: each candidate's measured cost (latency of the rewrite alone on the layer's
real input shape, MACs, bytes) and damage, one choice per layer under the global budget, the
plan applied and refit, and the whole-model checks that decide on a back-off."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcompress import allocation, graph, layer_refit, layer_timing
from onnxcompress.auto_candidates import LayerChoices
from onnxcompress.layers import Namer, replace_node
from onnxcompress.sensitivity import Measured

BUDGET_KINDS = ("latency", "macs", "bytes")


@dataclass
class Scored:
    """A candidate with everything the allocator and the report need."""

    layer: str
    method: str
    key: str
    config: dict[str, Any]
    macs: int
    params: int
    bytes: int
    latency_ms: float
    damage: float
    agreement: float | None = None

    def cost(self, kind: str) -> float:
        return {"latency": self.latency_ms, "macs": self.macs, "bytes": self.bytes}[kind]


@dataclass
class LayerTable:
    """One layer: what keeping it costs, and its scored candidates."""

    choice: LayerChoices
    keep: Scored
    options: list[Scored] = field(default_factory=list)

    def all(self) -> list[Scored]:
        return [self.keep, *self.options]


def score_layers(
    model: onnx.ModelProto,
    choices: list[LayerChoices],
    measured: dict[str, list[Measured]],
    threads: int,
    progress=None,
) -> list[LayerTable]:
    """Time each measured candidate against its layer (stand-in weights: speed depends on
    shapes only; timings are cached) and put cost and damage side by side."""
    constants = graph.constant_tensors(model)
    itemsize = {c.name: _itemsize(c) for c in choices}
    tables = []
    for choice in choices:
        by_key = {m.key: m for m in measured.get(choice.name, [])}
        keep = None
        options = []
        for option in choice.candidates:
            found = by_key.get(option.key)
            if found is None:
                continue
            layer = choice.layers[option.method]
            timing = layer_timing.compare_layer(constants, layer, _stand_in(found), threads)
            if keep is None:
                keep = Scored(
                    choice.name, "keep", "keep", {}, choice.macs, choice.params,
                    choice.params * itemsize[choice.name], timing["original_ms"], 0.0, 1.0,
                )  # fmt: skip
            c = option.candidate
            options.append(
                Scored(
                    choice.name,
                    option.method,
                    option.key,
                    dict(c.config),
                    c.macs,
                    c.params,
                    c.params * itemsize[choice.name],
                    timing["rewritten_ms"],
                    found.damage,
                    found.agreement,
                )  # fmt: skip
            )
            if progress is not None:
                progress.advance()
        if keep is not None:
            tables.append(LayerTable(choice, keep, options))
    return tables


def option_groups(tables: list[LayerTable], kind: str) -> list[list[allocation.Option]]:
    """One group per layer (keep first), each option labelled with its `Scored`."""
    return [[allocation.Option(s.cost(kind), s.damage, s) for s in table.all()] for table in tables]


def allocate(tables: list[LayerTable], kind: str, budget: float) -> dict[str, Scored]:
    """One option per layer (keep included) with the least total damage whose total `kind`
    cost stays within `budget` (the part of the budget the tabled layers may spend)."""
    picks = allocation.choose(option_groups(tables, kind), budget)
    return {table.choice.name: table.all()[i] for table, i in zip(tables, picks, strict=True)}


def curve(tables: list[LayerTable], kind: str, points: int) -> list[tuple[float, float]]:
    """(Σ cost, Σ damage) of the tabled layers' best plans from the cheapest to the full cost."""
    found = allocation.pareto_curve(option_groups(tables, kind), points)
    return [(point.cost, point.damage) for point in found]


def restore_worst(tables: list[LayerTable], plan: dict[str, Scored]) -> str | None:
    """Put back the original of the most damaging rewritten layer in `plan` (in place);
    its name, or None when every layer is already kept."""
    groups = option_groups(tables, "macs")
    choice = [table.all().index(plan[table.choice.name]) for table in tables]
    restored = allocation.back_off(choice, groups)
    if restored is None:
        return None
    table = next(t for t, a, b in zip(tables, choice, restored, strict=True) if a != b)
    plan[table.choice.name] = table.keep
    return table.choice.name


def apply_plan(
    model: onnx.ModelProto,
    plan: dict[str, Scored],
    tables: list[LayerTable],
    methods: dict[str, Any],
    context,
    refit: bool,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The model with every planned rewrite built for real, then refit in graph order on the
    compressed model's own activations. Returns (model, refit summary)."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    namer = Namer(model)
    sites = []
    for table in tables:
        chosen = plan.get(table.choice.name)
        if chosen is None or chosen.method == "keep":
            continue
        option = next(o for o in table.choice.candidates if o.key == chosen.key)
        layer = table.choice.layers[chosen.method]
        rewrite = methods[chosen.method].build(layer, option.candidate, namer)
        replace_node(rewritten, layer.name, rewrite.nodes, rewrite.initializers)
        if rewrite.refit is not None:
            sites.append(rewrite.refit)
    summary: dict[str, Any] = {"layers": 0}
    if refit and context.calibration and sites:
        summary = layer_refit.refit_layers(model, rewritten, sites, context)
    return graph.cleanup_and_sort(rewritten), summary


def budget_for(
    kind: str, target: float, tables: list[LayerTable], model_total: float
) -> tuple[float, float]:
    """(what the tabled layers may spend, what the rest of the model costs) for `target` ×
    the model's total `kind` cost. The rest is never counted below zero: layers timed alone
    can add up to more than the model (onnxruntime fuses Conv + Relu in the whole graph)."""
    layers = sum(t.keep.cost(kind) for t in tables)
    rest = max(0.0, model_total - layers)
    return target * model_total - rest, rest


def _stand_in(measured: Measured):
    """A rewrite with the measured one's nodes and random weights of the same shapes."""
    rng = np.random.default_rng(0)
    nodes = []
    for blob in measured.nodes:
        node = onnx.NodeProto()
        node.ParseFromString(blob)
        nodes.append(node)
    inits = []
    for name, dims, elem in measured.initializers:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        if np.issubdtype(dtype, np.floating):
            value = (0.1 * rng.standard_normal(dims)).astype(dtype)
        else:
            value = np.zeros(dims, dtype)  # indices (lrs's Gather): zeros are valid ones
        inits.append(numpy_helper.from_array(value, name))
    return _Rewrite(nodes, inits)


@dataclass
class _Rewrite:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]


def _itemsize(choice: LayerChoices) -> int:
    layer = next(iter(choice.layers.values()))
    return int(layer.weight.dtype.itemsize)
