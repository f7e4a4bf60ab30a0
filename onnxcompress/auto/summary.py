"""The `auto` section of the report: the kept plan per layer, every candidate, the allocator's
curve and the rounds; the node records of the kept plan, and which layers run in int8."""

from __future__ import annotations

import onnx

from onnxcompress import graph
from onnxcompress.auto import plan as auto_plan
from onnxcompress.auto.plan import LayerTable, Scored
from onnxcompress.auto.rounds import Rounds
from onnxcompress.auto.settings import SearchSettings
from onnxcompress.passkit import NodeRecord

CURVE_POINTS = 12


def auto_section(settings: SearchSettings, costs, rounds: Rounds, kept: int, timed) -> dict:
    """The report's `auto` section for the kept round; `costs`: the cost tables it was planned
    on, with the rest of the model and the total their ratios are taken with; `timed`: the
    float tables and the int8 ones (None when nothing was timed in int8), whose latencies
    the layers are reported with."""
    tables, rest, total = costs
    plan, _, refit, _, backed_off = rounds.built[kept]
    kind = settings.kind
    in_float, in_int8 = ({t.choice.name: t for t in found or []} for found in timed)
    layers = []
    for table in tables:
        name, chosen = table.choice.name, plan[table.choice.name]
        layer = {
            "node": name,
            "op": table.choice.op,
            "method": chosen.method,
            "config": chosen.config,
            "macs_before": table.keep.macs,
            "macs_after": chosen.macs,
            "params_before": table.keep.params,
            "params_after": chosen.params,
            # Timed in float, whichever costs the plan was chosen on; int8 below, if timed.
            "latency_ms_before": _latency_ms(in_float.get(name), "keep"),
            "latency_ms_after": _latency_ms(in_float.get(name), chosen.key),
            "damage": chosen.damage,
        }
        if in_int8:  # as the int8 tables cost it (a layer they leave in float: its float time)
            layer["latency_ms_in_int8"] = _latency_ms(in_int8.get(name), chosen.key)
        layers.append(layer)
    candidates = [
        {
            "node": s.layer,
            "method": s.method,
            "config": s.config,
            "latency_ms": round(s.latency_ms, 4),
            "macs": s.macs,
            "damage": s.damage,
        }
        for t in tables
        for s in t.options
    ]
    return {
        "budget": {"kind": kind, "target": settings.target},
        "layers": layers,
        "candidates": candidates,
        "curve": curve(tables, kind, plan, total, rest),
        "backed_off": backed_off,
        "rounds": list(rounds),  # the entries alone: what was built stays out of the report
        "chosen_round": kept,
        "model": rounds[kept],
        "refit": refit,
    }


def _latency_ms(table: LayerTable | None, key: str) -> float | None:
    """The latency of a layer's option `key` in its cost table (None: not timed there)."""
    found = next((s for s in table.all() if s.key == key), None) if table else None
    return None if found is None else round(found.latency_ms, 4)


def curve(tables: list[LayerTable], kind, plan, total, rest) -> list[dict]:
    """The allocator's best plans from the cheapest to the full cost (predicted cost ratio
    and total damage), and the chosen plan marked."""
    points = [
        {"cost_ratio": round((rest + cost) / total, 4), "damage": damage, "chosen": False}
        for cost, damage in auto_plan.curve(tables, kind, CURVE_POINTS)
    ]
    return points + [_point(plan, kind, total, rest, True)]


def _point(plan: dict[str, Scored], kind, total, rest, chosen: bool) -> dict:
    cost = rest + sum(s.cost(kind) for s in plan.values())
    damage = sum(s.damage for s in plan.values())
    return {"cost_ratio": round(cost / total, 4), "damage": damage, "chosen": chosen}


def mark_precision(records: list[NodeRecord], summary: dict, quantized: onnx.ModelProto) -> None:
    """When the kept model is int8, say per layer (records, and the summary's layer table)
    whether it runs in int8 (read off the model: its weight comes from a DequantizeLinear; a
    factorized layer's factors are quantized with the rest) or stayed in float, and why; a
    layer in int8 is timed after as in int8 (None where it was not), its record likewise."""
    int8_layers = graph.int8_layers(quantized)
    slower = summary["int8"]["float_layers"]
    layers = {layer["node"]: layer for layer in summary["layers"] if layer["method"] != "removed"}
    for record in records:
        if record.details.get("method") == "removed":
            continue
        in_int8 = record.status == "rewritten" or record.node in int8_layers
        if record.node in layers:
            _precision(layers[record.node], in_int8)
        if record.status == "rewritten":
            record.details["int8"] = True
        elif in_int8:
            record.status, record.reason, record.details = "rewritten", "", {"int8": True}
        else:
            why = (
                "its int8 kernel is slower" if record.node in slower
                else "next to a float layer, or the quantizer's choice"
            )  # fmt: skip
            record.reason = "; ".join(filter(None, [record.reason, f"in float in int8: {why}"]))
            record.details["int8"] = False
        if record.node in layers:
            _timing(record, layers[record.node])


def _precision(layer: dict, in_int8: bool) -> None:
    layer["int8"] = in_int8
    if in_int8:
        layer["latency_ms_after"] = layer.get("latency_ms_in_int8")


def _timing(record: NodeRecord, layer: dict) -> None:
    """A changed layer's record times it as the layer table does (one source for both)."""
    before, after = layer.get("latency_ms_before"), layer.get("latency_ms_after")
    record.details.pop("timing", None)
    if record.status == "rewritten" and before is not None and after is not None:
        record.details["timing"] = {"original_ms": before, "rewritten_ms": after}


def node_records(tables: list[LayerTable], plan, backed_off: list[str]) -> list[NodeRecord]:
    records = []
    for table in tables:
        name, chosen = table.choice.name, plan[table.choice.name]
        base = dict(macs_before=table.keep.macs, params_before=table.keep.params)
        if chosen.method == "keep":
            why = (
                "restored by the whole-model back-off" if name in backed_off
                else "kept: the budget was met without it"
            )  # fmt: skip
            status = "reverted" if name in backed_off else "skipped"
            records.append(NodeRecord(name, table.choice.op, status, why, **base))
            continue
        details = {
            "method": chosen.method,
            **chosen.config,
            "damage": chosen.damage,
            "timing": {
                "original_ms": round(table.keep.latency_ms, 4),
                "rewritten_ms": round(chosen.latency_ms, 4),
            },
        }
        records.append(
            NodeRecord(
                name,
                table.choice.op,
                "rewritten",
                "",
                params_after=chosen.params,
                macs_after=chosen.macs,
                details=details,
                **base,
            )  # fmt: skip
        )
    return records
