"""report.md: the run's report as Markdown tables (the charts are in report.html)."""

from __future__ import annotations

from typing import Any

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


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report: summary, fidelity, passes with options and notes, per-layer records,
    and the auto pass's choices when present."""
    parts = [
        "# onnxcompress report",
        f"`{_code(report['input'])}` → `{_code(report['output'])}`",
        f"**{_cell(verdict_line(report))}**" if verdict_line(report) else "",
        table(HEADLINE_COLUMNS, headline_rows(report)),
        "\n".join(f"- **{_cell(line)}**" for line in warning_lines(report)),
        "## Summary",
        table(SUMMARY_COLUMNS, summary_rows(report)),
        _cell(run_line(report)),
        f"## {_cell(fidelity_title(report))}",
        _cell(fidelity_note(report)),
        table(FIDELITY_COLUMNS, fidelity_rows(report)) if fidelity_rows(report) else "",
        _verdict(report),
        "## Passes",
    ]
    for entry in report.get("passes", []):
        parts.append(f"### {_cell(entry['name'])}: {_cell(pass_outcome(entry))}")
        parts.append("\n".join(f"- {_cell(note)}" for note in pass_notes(entry)))
        options = rows.option_rows(entry)
        if options:
            parts.append(table(("option", "value"), options))
    columns, layer_rows = rows.filled_columns(rows.LAYER_COLUMNS, rows.layer_rows(report))
    parts.append("## Layers")
    parts.append(table(columns, layer_rows) if layer_rows else "No node records.")
    for name, auto in rows.auto_sections(report):
        parts.extend(_auto(name, auto))
    return "\n\n".join(part for part in parts if part) + "\n"


def _verdict(report: dict[str, Any]) -> str:
    limit = report.get("max_rel_l2")
    if limit is None:
        return ""
    worst = report["validation"]["worst_rel_l2"]
    if worst is None:
        return f"Not validated, so the limit {limit:g} is **not met**."
    word = "within" if report.get("passed") else "**over**"
    return f"Worst relative L2 error {worst:.4g} is {word} the limit {limit:g}."


def _auto(name: str, auto: dict[str, Any]) -> list[str]:
    parts = [f"## Auto choices ({_cell(name)}): {_cell(rows.budget_text(auto))}"]
    parts.append(f"**{_cell(rows.kept_text(auto))}**" if rows.kept_text(auto) else "")
    layer_rows = rows.auto_layer_rows(auto)
    parts.append(table(rows.AUTO_COLUMNS, layer_rows) if layer_rows else "No layer chosen.")
    backed_off = auto.get("backed_off") or []
    if backed_off:
        parts.append("Backed off (kept original): " + ", ".join(_cell(n) for n in backed_off))
    plans = rows.round_rows(auto)
    if plans:
        parts.append(f"### Plans built and measured ({len(plans)})")
        parts.append(table(rows.ROUND_COLUMNS, plans))
    candidates = rows.candidate_rows(auto)
    if candidates:
        parts.append(f"### Candidates ({len(candidates)})")
        parts.append(table(rows.CANDIDATE_COLUMNS, candidates))
    return parts


def table(columns: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    """A GitHub-flavoured Markdown table; `|` and line breaks in cells are escaped."""
    lines = [
        "| " + " | ".join(_cell(c) or " " for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in body]
    return "\n".join(lines)


def _cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: Any) -> str:
    return str(text).replace("`", "'")
