"""auto's int8 rounds: the original and the best float plan quantized, the original with the
layers whose int8 kernel is slower left in float, and plans chosen on int8 timings. Whether
int8 pays depends on the runtime and the shapes, so each is measured like every round."""

from __future__ import annotations

import dataclasses

import onnx

from onnxcompress import graph
from onnxcompress.auto import plan as auto_plan
from onnxcompress.auto.choice import LATENCY_SLACK
from onnxcompress.auto.plan import LayerTable
from onnxcompress.auto.rounds import Built, Rounds, Search

# A layer whose int8 kernel, timed alone, takes this many times its float one is tried in float
# inside the int8 model (timed alone, int8 also pays quantizing its input and dequantizing its
# output, which inside an int8 model it does not: a small excess is that, not the kernel).
INT8_SLOWER = 1.2


def int8_rounds(search: Search, best_float: Built, rounds: Rounds, quantize) -> float | None:
    """Two more rounds: the original quantized to int8 (every layer kept) and the best float
    plan quantized; kept only if they win (see docs/decisions.md#no-int8-around-float-factors).
    Returns the int8 original's latency ratio (None when the quantizer failed on it)."""
    sources = [("the original", search.original_built())]
    if auto_plan.factorized(best_float.plan):
        sources.append(("the best float plan", best_float))
    checks = []
    for of, built in sources:
        checks.append(search.int8_round(built, None, quantize, rounds))
        rounds[-1]["of"] = of
    return checks[0].get("latency_ratio")


def int8_table_rounds(search: Search, measured, quantize, quantize_layer, original_int8, total):
    """Plans chosen for int8: every candidate and layer timed quantized, the budget set from
    the int8 original's measured latency, then the same tighten/loosen rounds as the float
    search, each plan measured quantized. Returns the int8 cost tables with the rest and
    total of the float original their ratios are taken with, and the rounds."""
    tables, context, target = search.tables, search.context, search.settings.target
    count = sum(len(t.options) for t in tables)
    with context.progress("timing candidates in int8", count) as bar:
        tables8 = auto_plan.int8_tables(
            search.model, tables, measured, context.threads, quantize_layer, bar
        )
    rounds = Rounds()
    in_float = int8_slower(tables, tables8)
    if in_float:
        mixed = mixed_original(search, in_float, quantize, rounds)
        if mixed is None or mixed >= original_int8:
            in_float = []
        else:  # the plans below start from this model: those layers cost their float time
            original_int8 = mixed
            quantize = keeping_in_float(quantize, in_float)
            for table, table8 in zip(tables, tables8, strict=True):
                if table.choice.name in in_float:
                    table8.keep = dataclasses.replace(table.keep)
    # Ratios are of the float original; the int8 tables' costs add up to the int8 model's.
    budget, rest, scale = auto_plan.budget_for(
        "latency", target / original_int8, tables8, original_int8 * total
    )
    if original_int8 <= target + LATENCY_SLACK:
        return (tables8, rest, scale / original_int8), rounds
    floor = auto_plan.floor(tables8, "latency")
    start = (max(budget, floor), floor, scale / original_int8)
    more = search.latency_rounds(start, tables8, quantize)
    for round_, built in zip(more, more.built, strict=True):
        kept = [name for name in in_float if built.plan[name].method == "keep"]
        if kept:
            round_["float_layers"] = kept
    rounds.merge(more)
    return (tables8, rest, scale / original_int8), rounds


def mixed_on_target(
    search: Search, measured, quantize, quantize_layer, rounds: Rounds
) -> list[LayerTable]:
    """With the int8 original on target, one more round: it with the layers whose int8
    kernel is slower left in float, which quantizes less (less error) and may run faster (see
    docs/decisions.md#mixed-original-when-int8-is-on-target). Only the layers' own int8
    timings are needed, not every candidate's; their tables are returned (for the report)."""
    tables, context = search.tables, search.context
    with context.progress("timing layers in int8", len(tables)) as bar:
        keeps8 = auto_plan.int8_tables(
            search.model, tables, measured, context.threads, quantize_layer, bar, keep_only=True
        )
    in_float = int8_slower(tables, keeps8)
    if in_float:
        mixed_original(search, in_float, quantize, rounds)
    return keeps8


def int8_slower(tables: list[LayerTable], tables8: list[LayerTable]) -> list[str]:
    """The layers whose int8 kernel, timed alone, is over INT8_SLOWER times their float one
    (see docs/decisions.md#int8_slower)."""
    return [
        table.choice.name
        for table, table8 in zip(tables, tables8, strict=True)
        if table8.keep.latency_ms > INT8_SLOWER * table.keep.latency_ms
    ]


def keeping_in_float(quantize, layers: list[str]):
    """`quantize` leaving the named layers (those a plan still has) in float."""

    def mixed(source: onnx.ModelProto) -> onnx.ModelProto:
        return quantize(source, graph.float_region(source, layers))

    return mixed


def mixed_original(search: Search, layers: list[str], quantize, rounds: Rounds) -> float | None:
    """One more round: the original in int8 but for `layers` (and the ops up to the next
    layers) in float. Its latency ratio, None if it failed."""
    check = search.int8_round(
        search.original_built(), None, keeping_in_float(quantize, layers), rounds
    )
    rounds[-1].update({"of": "the original", "float_layers": layers})
    return None if check.get("tolerance_failed") else check.get("latency_ratio")
