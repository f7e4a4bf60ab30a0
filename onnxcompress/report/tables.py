"""Terminal tables of an analysis, and short human numbers (1.2M, 41.2M, 3.1G)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:  # the analysis imports this module; types only, no import cycle
    from onnxcompress.analyse import ModelAnalysis

_UNITS = ["", "K", "M", "G", "T", "P"]


def human(n: float) -> str:
    """`1234567` -> "1.2M", `41_091_712` -> "41.1M", `3.1e9` -> "3.1G"; below 1000 as is."""
    sign = "-" if n < 0 else ""
    value = abs(n)
    if value < 1000:
        return f"{sign}{value:g}" if isinstance(value, float) else f"{sign}{value}"
    unit = 0
    # 999.95 and up would print as "1000.0" of this unit; carry it to the next one.
    while value >= 999.95 and unit < len(_UNITS) - 1:
        value /= 1000
        unit += 1
    return f"{sign}{value:.1f}{_UNITS[unit]}"


def format_table(analysis: ModelAnalysis, top: int | None = None) -> Table:
    """Per-layer table: name, op, output shape, params, MACs, % of MACs, then a totals row.

    `top` keeps the `top` nodes with the most MACs, largest first; otherwise graph order.
    """
    total = analysis.total_macs
    rows = analysis.nodes
    if top is not None:
        rows = sorted(rows, key=lambda stats: stats.macs, reverse=True)[:top]
    table = Table(title="Per-layer analysis", show_footer=False)
    table.add_column("name", overflow="fold")
    table.add_column("op")
    table.add_column("output shape")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("% MACs", justify="right")
    for stats in rows:
        shape = "×".join(map(str, stats.output_shapes[0])) if stats.output_shapes else ""
        if stats.note:
            shape = f"{shape} ({stats.note})" if shape else f"({stats.note})"
        table.add_row(
            stats.name,
            stats.op,
            shape,
            human(stats.params),
            human(stats.macs),
            _percent(stats.macs, total),
        )
    hidden = len(analysis.nodes) - len(rows)
    if hidden:
        table.add_row(f"… {hidden} more nodes", "", "", "", "", "", style="dim")
    table.add_section()
    table.add_row(
        "total",
        f"{len(analysis.nodes)} nodes",
        "",
        human(analysis.total_params),
        human(total),
        _percent(total, total),
        style="bold",
    )
    return table


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
