"""report.html: one self-contained page (inline CSS, charts as base64 PNG data URIs, no
scripts, no external links) with the report's tables and charts. All text is escaped."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from onnxcompress.report import plots as plots
from onnxcompress.report import rows as rows
from onnxcompress.report.headline import HEADLINE_COLUMNS, headline_rows
from onnxcompress.report.terminal import (
    FIDELITY_COLUMNS,
    SUMMARY_COLUMNS,
    fidelity_note,
    fidelity_rows,
    fidelity_title,
    pass_notes,
    pass_outcome,
    run_line,
    summary_rows,
    verdict_line,
    warning_lines,
)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
td.text, th.text { text-align: left; }
tr.skipped td { color: #777; } tr.reverted td { background: #fff6e5; }
.warning { color: #a40; } .note { color: #555; }
.verdict { font-size: 1.15em; } .broken { color: #b00; } .lossy { color: #a40; }
.deployable { color: #070; }
table.headline { font-size: 15px; } table.headline td:first-child { font-weight: 600; }
img { max-width: 100%; display: block; margin: .5em 0; }
code { background: #f4f4f4; padding: 0 .3em; }
"""
# Columns of text (left-aligned) in the per-layer tables.
_TEXT_COLUMNS = {
    "pass", "node", "role", "op", "status", "precision", "method / config", "method", "config",
    "reason", "built as", "outcome",
}  # fmt: skip


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML document."""
    body = [
        "<h1>onnxcompress report</h1>",
        f"<p><code>{escape(str(report['input']))}</code> → "
        f"<code>{escape(str(report['output']))}</code></p>",
    ]
    verdict, run = verdict_line(report), run_line(report)
    if verdict:
        kind = escape(report["verdict"]["kind"].replace(" ", "-"))
        body.append(f'<p class="verdict {kind}"><strong>{escape(verdict)}</strong></p>')
    body.append(table(HEADLINE_COLUMNS, headline_rows(report), css="headline"))
    body += [f'<p class="warning">{escape(line)}</p>' for line in warning_lines(report)]
    body += ["<h2>Summary</h2>", table(SUMMARY_COLUMNS, summary_rows(report))]
    if run:
        body.append(f"<p>{escape(run)}</p>")
    body.append(f"<h2>{escape(fidelity_title(report))}</h2>")
    if fidelity_note(report):
        body.append(f'<p class="warning">{escape(fidelity_note(report))}</p>')
    if fidelity_rows(report):
        body.append(table(FIDELITY_COLUMNS, fidelity_rows(report)))
    if not plots.plots_available():
        body.append(f'<p class="note">{escape(plots.INSTALL_HINT)}</p>')
    body += _passes(report)
    body += _layers(report)
    for name, auto in rows.auto_sections(report):
        body += _auto(name, auto)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>onnxcompress report: {escape(str(report['input']))}</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _passes(report: dict[str, Any]) -> list[str]:
    parts = ["<h2>Passes</h2>"]
    for entry in report.get("passes", []):
        parts.append(f"<h3>{escape(entry['name'])}: {escape(pass_outcome(entry))}</h3>")
        for note in pass_notes(entry):
            kind = "warning" if note.startswith("warning") else "note"
            parts.append(f'<p class="{kind}">{escape(note)}</p>')
        options = rows.option_rows(entry)
        if options:
            parts.append(table(("option", "value"), options))
    return parts


def _layers(report: dict[str, Any]) -> list[str]:
    columns, layer_rows = rows.filled_columns(rows.LAYER_COLUMNS, rows.layer_rows(report))
    if not layer_rows:
        return ["<h2>Layers</h2>", "<p>No node records.</p>"]
    status = columns.index("status")
    parts = ["<h2>Layers</h2>", table(columns, layer_rows, row_class=status)]
    for figures, title, unit in LAYER_CHARTS:
        parts.append(image(plots.before_after_bars(figures(report), title, unit), title))
    return parts


# The per-layer charts: what a pass changes, each drawn when some record gives its figures.
LAYER_CHARTS = (
    (rows.rewritten_macs, "MACs per rewritten layer", "MACs"),
    (rows.record_latencies, "latency per timed layer", "ms (median)"),
    (rows.nonzero_weights, "nonzero weights per pruned layer", "weights"),
    (rows.channel_counts, "channels per pruned channel group", "channels"),
    (rows.weight_bytes, "weight bytes per layer of the int8 model (float → as written)", "bytes"),
)


def _auto(name: str, auto: dict[str, Any]) -> list[str]:
    parts = [f"<h2>Auto choices ({escape(name)}): {escape(rows.budget_text(auto))}</h2>"]
    if rows.kept_text(auto):
        parts.append(f'<p class="kept"><strong>{escape(rows.kept_text(auto))}</strong></p>')
    layer_rows = rows.auto_layer_rows(auto)
    parts.append(table(rows.AUTO_COLUMNS, layer_rows) if layer_rows else "<p>No layer chosen.</p>")
    backed_off = auto.get("backed_off") or []
    if backed_off:
        names = ", ".join(escape(str(n)) for n in backed_off)
        parts.append(f"<p>Backed off (kept original): {names}</p>")
    title = "latency per layer"
    parts.append(image(plots.before_after_bars(rows.auto_latencies(auto), title, "ms"), title))
    title = "damage against cost"
    parts.append(image(plots.damage_cost_curve(auto.get("curve") or [], title), title))
    plans = rows.round_rows(auto)
    if plans:
        parts.append(f"<h3>Plans built and measured ({len(plans)})</h3>")
        parts.append(table(rows.ROUND_COLUMNS, plans))
    candidates = rows.candidate_rows(auto)
    if candidates:
        parts.append(f"<details><summary>{len(candidates)} candidates</summary>")
        parts.append(table(rows.CANDIDATE_COLUMNS, candidates))
        parts.append("</details>")
    return parts


def table(
    columns: tuple[str, ...],
    body: list[tuple[str, ...]],
    row_class: int | None = None,
    css: str = "",
) -> str:
    """An escaped HTML table of CSS class `css`; `row_class` names the column whose value
    becomes the row's CSS class (status: skipped rows grey, reverted rows tinted)."""
    text = [i for i, c in enumerate(columns) if c in _TEXT_COLUMNS]
    head = "".join(
        f'<th class="text">{escape(c)}</th>' if i in text else f"<th>{escape(c)}</th>"
        for i, c in enumerate(columns)
    )
    lines = [f'<table class="{escape(css)}">' if css else "<table>", f"<tr>{head}</tr>"]
    for row in body:
        cells = "".join(
            f'<td class="text">{escape(v)}</td>' if i in text else f"<td>{escape(v)}</td>"
            for i, v in enumerate(row)
        )
        css = f' class="{escape(row[row_class])}"' if row_class is not None else ""
        lines.append(f"<tr{css}>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def image(png: bytes | None, title: str) -> str:
    """An <img> with the PNG inline and its title as the text, or nothing (no data, or no
    matplotlib)."""
    if png is None:
        return ""
    data = base64.b64encode(png).decode()
    return f'<img alt="{escape(title)}" src="data:image/png;base64,{data}">'
