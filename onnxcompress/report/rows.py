"""The report's tables as plain text rows, shared by the Markdown and HTML renderings: pass
options, the per-layer records of every pass, and the `auto` pass's layers and candidates."""

from __future__ import annotations

from typing import Any

from onnxcompress.report.tables import human

LAYER_COLUMNS = (
    "pass",
    "node",
    "role",
    "op",
    "status",
    "precision",
    "method / config",
    "MACs before → after",
    "params before → after",
    "latency ms before → after",
    "reason",
)
AUTO_COLUMNS = (
    "node",
    "op",
    "method",
    "config",
    "MACs before → after",
    "params before → after",
    "latency ms before → after",
    "damage (sensitivity)",
)
CANDIDATE_COLUMNS = ("node", "method", "config", "latency ms", "MACs", "damage")
ROUND_COLUMNS = (
    "plan",
    "built as",
    "budget",
    "latency ratio",
    "in the search",
    "rel L2",
    "top-1 drop",
    "outcome",
)


def layer_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per node record of every pass, in the order of LAYER_COLUMNS."""
    rows = []
    for entry in report.get("passes", []):
        for record in entry.get("records", []):
            details = record.get("details") or {}
            timing = details.get("timing") or {}
            rows.append(
                (
                    entry["name"],
                    str(record["node"]),
                    record.get("role", ""),  # first layer, classifier: see layer_roles
                    str(record["op"]),
                    str(record["status"]),
                    precision_text(details),
                    config_text(details),
                    change(record.get("macs_before"), record.get("macs_after")),
                    change(record.get("params_before"), record.get("params_after")),
                    change(timing.get("original_ms"), timing.get("rewritten_ms"), ms=True),
                    str(record.get("reason", "")),
                )
            )
    return rows


def filled_columns(
    columns: tuple[str, ...], body: list[tuple[str, ...]]
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The columns some row fills, and the rows cut to them (precision in a float run, roles
    in a model without named layers: columns that would only be empty are left out)."""
    kept = [i for i in range(len(columns)) if any(row[i] for row in body)]
    return tuple(columns[i] for i in kept), [tuple(row[i] for i in kept) for row in body]


def precision_text(details: dict[str, Any]) -> str:
    """int8 or float, for the layers of an int8 model ("" where precision was not at stake)."""
    if "int8" not in details:
        return ""
    return "int8" if details["int8"] else "float"


def option_rows(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(option, value) for one pass of the report; an option left unset that the pass gave a
    value (e.g. the default MAC budget) shows that value as the pass's own, any other unset
    one says so (the option's help says what unset means)."""
    options = entry.get("options") or {}
    summary = entry.get("summary") or {}
    rows = []
    for name, value in options.items():
        default = None if value is not None else _pass_default(name, summary)
        if default is not None:
            rows.append((str(name), f"{_value(default)} (the pass's default)"))
        else:
            rows.append((str(name), "not set" if value is None else _value(value)))
    return rows


def _pass_default(name: str, summary: dict[str, Any]) -> Any:
    """What a pass made of an option left unset: its `effective_options` entry, else a figure
    of the summary by that name (a flag there may mean something else: not taken)."""
    effective = summary.get("effective_options") or {}
    if name in effective:
        return effective[name]
    value = summary.get(name)
    return value if isinstance(value, int | float | str) and not isinstance(value, bool) else None


def auto_sections(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(pass name, summary["auto"]) for every pass whose summary carries an `auto` section."""
    sections = []
    for entry in report.get("passes", []):
        auto = (entry.get("summary") or {}).get("auto")
        if isinstance(auto, dict):
            sections.append((entry["name"], auto))
    return sections


def budget_text(auto: dict[str, Any]) -> str:
    budget = auto.get("budget") or {}
    if not budget:
        return "no budget given"
    text = f"{budget.get('kind', '?')} budget, target {_value(budget.get('target'))}"
    upcast = auto.get("upcast") or {}
    if upcast.get("note"):  # what auto did with a float16 model, in its own words
        text += f" ({upcast['note']})"
    removed = (auto.get("blocks") or {}).get("removed")
    if removed:
        text += f"; residual blocks removed: {', '.join(removed)}"
    return text


def kept_text(auto: dict[str, Any]) -> str:
    """Which plan the auto search kept and why, in one sentence ("" when it built none)."""
    rounds, kept = auto.get("rounds") or [], auto.get("chosen_round")
    if kept is None or not rounds:
        return ""
    text = f"kept plan {kept} of the {len(rounds)} built and measured"
    because = auto.get("kept_because")  # reports made before it was recorded lack it
    return f"{text}: {because}" if because else text


def auto_layer_rows(auto: dict[str, Any]) -> list[tuple[str, ...]]:
    """The auto pass's chosen layers, in the order of AUTO_COLUMNS."""
    return [
        (
            str(layer.get("node", "")),
            str(layer.get("op", "")),
            _method_text(layer),
            config_text(layer.get("config")),
            change(layer.get("macs_before"), layer.get("macs_after")),
            change(layer.get("params_before"), layer.get("params_after")),
            change(layer.get("latency_ms_before"), layer.get("latency_ms_after"), ms=True),
            _value(layer.get("damage")),
        )
        for layer in auto.get("layers") or []
    ]


def _method_text(layer: dict[str, Any]) -> str:
    """A layer's method, with its precision when the kept model is int8."""
    method = str(layer.get("method", ""))
    if "int8" not in layer:
        return method
    if not layer["int8"]:
        return f"{method} (float)"
    return "int8" if method == "keep" else f"{method} + int8"


def candidate_rows(auto: dict[str, Any]) -> list[tuple[str, ...]]:
    return [
        (
            str(c.get("node", "")),
            str(c.get("method", "")),
            config_text(c.get("config")),
            _value(c.get("latency_ms")),
            _number(c.get("macs")),
            _value(c.get("damage")),
        )
        for c in auto.get("candidates") or []
    ]


def rewritten_macs(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(node, MACs before, MACs after) of every rewritten record, for the MACs chart."""
    return figure_pairs(report, "macs_before", "macs_after", status="rewritten")


def nonzero_weights(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(node, weights, nonzero weights) of every pruned layer (its record gives a sparsity)."""
    return figure_pairs(report, "params_before", "params_after", marked_by="sparsity")


def channel_counts(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(group, channels before, channels kept) of every channel group pruned."""
    return figure_pairs(report, "channels_before", "channels_after")


def weight_bytes(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(node, weight bytes in float, as written) of every layer of an int8 model."""
    return figure_pairs(report, "weight_bytes_before", "weight_bytes_after")


def figure_pairs(
    report: dict[str, Any], before: str, after: str, status: str = "", marked_by: str = ""
) -> list[tuple[str, float, float]]:
    """(node, before, after) of every record giving both figures (on the record or in its
    details), for a chart; only records of `status`, or whose details have `marked_by`."""
    pairs = []
    for entry in report.get("passes", []):
        for record in entry.get("records", []):
            details = record.get("details") or {}
            figures = {**details, **record}
            if (status and record.get("status") != status) or (
                marked_by and marked_by not in details
            ):
                continue
            if figures.get(before) is not None and figures.get(after) is not None:
                pairs.append((str(record["node"]), figures[before], figures[after]))
    return pairs


def record_latencies(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(node, ms before, ms after) of the records timed layer by layer (never_slower)."""
    rows = []
    for entry in report.get("passes", []):
        for record in entry.get("records", []):
            timing = (record.get("details") or {}).get("timing") or {}
            if timing.get("original_ms") is not None and timing.get("rewritten_ms") is not None:
                label = f"{record['node']} ({record['status']})"
                rows.append((label, timing["original_ms"], timing["rewritten_ms"]))
    return rows


def round_rows(auto: dict[str, Any]) -> list[tuple[str, ...]]:
    """The plans the auto search built and measured, in the order of ROUND_COLUMNS: what
    each was, its measured latency ratio (the final windows, and the search's), its output
    error, and whether it was kept, passed over for breaking the outputs, or failed."""
    return [
        (
            str(i),
            _built_as(r),
            _value(r.get("budget")),
            _value(r.get("latency_ratio")),
            _value(r.get("latency_ratio_search")),
            _value(r.get("rel_l2")),
            _value(r.get("accuracy_drop")),
            _outcome(auto, i, r),
        )
        for i, r in enumerate(auto.get("rounds") or [])
    ]


def _built_as(round_: dict[str, Any]) -> str:
    if not round_.get("int8"):
        blocks = round_.get("blocks")
        if not blocks:
            return "float"
        return f"float, blocks removed: {', '.join(blocks)}"
    if round_.get("costs") == "int8":
        built = "int8, chosen on int8 costs"
    else:
        built = f"int8 of {round_.get('of', 'a plan')}"
    if round_.get("float_layers"):
        built += f"; in float: {', '.join(round_['float_layers'])}"
    return built


def _outcome(auto: dict[str, Any], index: int, round_: dict[str, Any]) -> str:
    if index == auto.get("chosen_round"):
        return "kept"
    if round_.get("tolerance_failed"):
        return f"failed: {round_['tolerance_failed']}"
    over = auto.get("broken_over")
    if over is not None and (round_.get("rel_l2") or 0.0) > over:
        return f"breaks the outputs (rel L2 > {over:g})"
    return ""


def auto_latencies(auto: dict[str, Any]) -> list[tuple[str, float, float]]:
    return [
        (str(layer["node"]), layer["latency_ms_before"], layer["latency_ms_after"])
        for layer in auto.get("layers") or []
        if layer.get("latency_ms_before") is not None and layer.get("latency_ms_after") is not None
    ]


def config_text(config: Any) -> str:
    """Scalar settings as `key=value` (nested figures such as timing have their own column)."""
    if config is None:
        return ""
    if not isinstance(config, dict):
        return _value(config)
    return ", ".join(
        f"{key}={_value(value)}"
        for key, value in config.items()
        if not isinstance(value, dict | list) and key not in _OWN_COLUMNS
    )


# Details with a column or chart of their own, left out of the settings text.
_OWN_COLUMNS = {"timing", "int8", "weight_bytes_before", "weight_bytes_after"}


def change(before: Any, after: Any, ms: bool = False) -> str:
    """`before → after (ratio×)`, or what is known of it."""
    show = _value if ms else _number
    if before is None and after is None:
        return ""
    if after is None:
        return show(before)
    if before is None:
        return f"→ {show(after)}"
    ratio = f" ({after / before:.2f}×)" if before else ""
    return f"{show(before)} → {show(after)}{ratio}"


def _number(value: Any) -> str:
    if value is None:
        return ""
    return human(value) if isinstance(value, int | float) else str(value)


def _value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
