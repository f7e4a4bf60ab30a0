"""`auto`'s plan: each candidate's measured cost (latency of the rewrite alone on the layer's
real input shape, MACs, bytes) and damage, one choice per layer under the global budget, the
plan applied and refit, and the whole-model checks that decide on a back-off."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxcompress import executor, graph, layer_refit
from onnxcompress.auto import latency_cache as latency_cache
from onnxcompress.auto import layer_timing as layer_timing
from onnxcompress.auto.candidates import LayerChoices
from onnxcompress.auto.sensitivity import Measured
from onnxcompress.layers import Namer, replace_node
from onnxcompress.maths import allocation as allocation

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
    time_alone: bool = True,
    pool=None,
) -> list[LayerTable]:
    """Put each measured candidate's cost and damage side by side. With `time_alone`, time it
    against its layer (`time_layers_alone`, on `pool` when it is remote); without, latencies
    stay 0 for `time_in_graph`."""
    tables = []
    for choice in choices:
        by_key = {m.key: m for m in measured.get(choice.name, [])}
        options = [(o, by_key[o.key]) for o in choice.candidates if o.key in by_key]
        if not options:
            continue
        table = LayerTable(
            choice, _scored(choice, "keep", "keep", {}, choice.macs, choice.params, 0.0, None)
        )
        for option, found in options:
            c = option.candidate
            scored = _scored(choice, option.method, option.key, dict(c.config), c.macs, c.params,
                             found.damage, found.agreement)  # fmt: skip
            table.options.append(scored)
        tables.append(table)
    if time_alone:
        time_layers_alone(model, tables, measured, threads, progress, pool=pool)
    return tables


def time_layers_alone(
    model, tables, measured, threads, progress=None, quantize=None, pool=None
) -> None:
    """Fill in every candidate's latency: timed against its layer (stand-in weights: speed
    depends on shapes only; timings are cached), net of one onnxruntime call's fixed cost,
    which a layer inside the whole graph does not pay. `quantize(model, feeds)`: time both
    sides as int8 models instead. A layer is one `layer_timing.TimingJob`; with a remote
    `pool` (a cluster) the jobs are timed there, each reserving `threads` CPUs of a worker,
    else here, one after another (timings side by side would slow each other)."""
    constants = graph.constant_tensors(model)
    jobs = [_timing_job(table, measured, constants, threads, quantize) for table in tables]
    remote = pool is not None and pool.remote and quantize is None
    runner = pool if remote else executor.SerialExecutor()
    timed = runner.map(layer_timing.time_candidates, jobs, threads)
    for table, times in zip(tables, timed, strict=True):
        table.keep.latency_ms = times.keep_ms
        for scored, ms in zip(table.options, times.candidate_ms, strict=True):
            scored.latency_ms = ms
        if progress is not None:
            progress.advance(len(table.options))


def _timing_job(table, measured, constants, threads, quantize) -> layer_timing.TimingJob:
    choice = table.choice
    by_key = {m.key: m for m in measured[choice.name]}
    names = {name for layer in choice.layers.values() for name in layer.node.input}
    weights = {name: constants[name] for name in names if name in constants}
    candidates = [(s.method, by_key[s.key]) for s in table.options]
    return layer_timing.TimingJob(
        choice.name, choice.layers, weights, candidates, threads, quantize=quantize
    )


def int8_tables(
    model, tables, measured, threads, quantize, progress=None, keep_only: bool = False
) -> list[LayerTable]:
    """Copies of `tables` whose latencies are the candidates' and layers' timed as int8:
    int8 kernels favour other shapes than float ones (see docs/decisions.md#plans-on-int8-costs),
    so a plan meant to be quantized is chosen on these. `keep_only`: the layers' own latencies
    only (each timed against its first candidate, which the copy keeps; the others are dropped)."""
    copy = dataclasses.replace
    copies = [
        LayerTable(t.choice, copy(t.keep), [copy(s) for s in t.options[: 1 if keep_only else None]])
        for t in tables
    ]
    time_layers_alone(model, copies, measured, threads, progress, quantize)
    return copies


def time_in_graph(
    model: onnx.ModelProto,
    tables: list[LayerTable],
    measured: dict[str, list[Measured]],
    feeds: dict[str, np.ndarray],
    threads: int,
    progress=None,
) -> None:
    """Latency costs from the whole model instead of the layer alone: each candidate is timed
    as the model with only that layer replaced (stand-in weights), against the original, and
    the layer's options are costed by what the model saves. A layer's keep option costs its
    best saving S, a candidate S minus its saving, so costs stay ≥ 0 and differences within a
    layer are the measured savings; the layers' costs then sum to the part of the model's
    latency the plan can remove (`budget_for` takes the rest as fixed). Catches what timing a
    layer alone misses: fusions (Conv + Relu), memory traffic between nodes, and kernels that
    run differently inside the graph."""
    for table in tables:
        by_key = {m.key: m for m in measured.get(table.choice.name, [])}
        models = {"original": model}
        for option in table.options:
            trial = onnx.ModelProto()
            trial.CopyFrom(model)
            stand_in = layer_timing.stand_in(by_key[option.key])
            replace_node(trial, table.choice.name, stand_in.nodes, stand_in.initializers)
            models[option.key] = trial
        medians = latency_cache.time_subgraphs(
            models, feeds, threads, repeats=GRAPH_REPEATS, min_seconds=GRAPH_MIN_SECONDS
        )
        savings = {o.key: medians["original"] - medians[o.key] for o in table.options}
        best = max(0.0, *savings.values())
        table.keep.latency_ms = best
        for option in table.options:
            option.latency_ms = best - savings[option.key]
            if progress is not None:
                progress.advance()


# Whole-model timings per layer: enough runs that a layer's saving stands out of the noise.
GRAPH_REPEATS = 40
GRAPH_MIN_SECONDS = 0.2


def _scored(choice, method, key, config, macs, params, damage, agreement) -> Scored:
    itemsize = int(next(iter(choice.layers.values())).weight.dtype.itemsize)
    return Scored(
        choice.name, method, key, config, macs, params, params * itemsize, 0.0, damage, agreement
    )


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
    compressed model's own activations, each rewritten layer to its output in `model`.
    Returns (model, refit summary)."""
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
) -> tuple[float, float, float]:
    """(what the tabled layers may spend, what the rest of the model costs, the total that
    ratios are taken of) for `target` × the model's total `kind` cost. Layers timed alone can
    add up to more than the whole model (each call has its own memory traffic; onnxruntime
    fuses Conv + Relu in the graph): then the rest is taken as nothing and the budget as that
    share of the layers' own sum, which is also the total ratios refer to."""
    layers = sum(t.keep.cost(kind) for t in tables)
    if layers >= model_total:
        return target * layers, 0.0, layers
    rest = model_total - layers
    return target * model_total - rest, rest, model_total


def factorized(plan: dict[str, Scored]) -> bool:
    """Whether a plan rewrites any layer (a plan of all keeps is the original model)."""
    return any(s.method != "keep" for s in plan.values())


def floor(tables: list[LayerTable], kind: str) -> float:
    """The tabled layers' cost with every layer at its cheapest candidate."""
    return sum(min(s.cost(kind) for s in t.all()) for t in tables)
