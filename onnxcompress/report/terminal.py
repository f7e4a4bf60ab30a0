"""The run's report for the terminal: before → after table, fidelity, what each pass did;
the rows are shared with the markdown and HTML renderers."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from onnxcompress.report.tables import human


def _size(value: float | None, unit: str = "") -> str:
    return "-" if value is None else human(value) + unit


def _ratio(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.3f}×"


SUMMARY_COLUMNS = ("", "before", "after", "after / before")
FIDELITY_COLUMNS = ("output", "max abs", "rel L2", "cosine", "top-1 agree", "accuracy")


def summary_table(report: dict[str, Any]) -> Table:
    """Before → after: MACs, parameters, bytes on disk, latency."""
    table = Table(title=f"{report['input']} → {report['output']}", title_justify="left")
    for column in SUMMARY_COLUMNS:
        table.add_column(column, justify="right" if column else "left")
    for row in summary_rows(report):
        table.add_row(*row)
    return table


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, before, after, after / before) as text, for every output format."""
    before, after = report["before"], report["after"]
    rows = [
        figure_row("MACs", before["total_macs"], after["total_macs"]),
        figure_row("parameters", before["total_params"], after["total_params"]),
        figure_row("weight bytes", before["weight_bytes"], after["weight_bytes"], "B"),
        figure_row("file bytes", report["input_bytes"], report["output_bytes"], "B"),
    ]
    sizes = report.get("sizes") or {}
    if "original" in sizes and "result" in sizes:
        for label, key in (
            ("plain .onnx bytes", "bytes"),
            ("  gzip -9", "gzip9"),
            ("  zstd -19", "zstd19"),
        ):
            rows.append(figure_row(label, sizes["original"][key], sizes["result"][key], "B"))
    return [*rows, latency_row(report)]


def figure_row(
    label: str, before: float | None, after: float | None, unit: str = ""
) -> tuple[str, str, str, str]:
    """(figure, before, after, after / before) of one count, in human units."""
    return (label, _size(before, unit), _size(after, unit), _ratio(before, after))


def latency_row(report: dict[str, Any]) -> tuple[str, str, str, str]:
    """The benchmark's median latency before → after, or why it was not measured."""
    bench = report.get("benchmark")
    if not bench:
        return ("latency", "not measured (--no-bench)", "", "")
    b, a = bench["original"]["median_ms"], bench["result"]["median_ms"]
    return (
        f"latency (median, {bench['original']['threads']} threads)",
        f"{b:.3f} ms",
        f"{a:.3f} ms",
        f"{a / b:.3f}× (speedup {bench['speedup']:.2f}×)",
    )


def fidelity_title(report: dict[str, Any]) -> str:
    """What the fidelity figures were measured on, or the "not validated: ..." status."""
    validation = report["validation"]
    if not is_validated(report):
        return validation["status"]
    title = f"fidelity on {validation['samples']} samples ({report['calibration']})"
    status = validation.get("status")
    return f"{title} — {status}" if status else title


def is_validated(report: dict[str, Any]) -> bool:
    return report["validation"].get("validated", True)  # reports before the flag were


def fidelity_note(report: dict[str, Any]) -> str:
    """Why the run has no fidelity figures ("" when it has)."""
    return "" if is_validated(report) else report["validation"]["detail"]


def fidelity_table(report: dict[str, Any]) -> Table | Text:
    if not is_validated(report):
        return Text(f"{fidelity_title(report)} ({fidelity_note(report)})", style="bold red")
    table = Table(title=fidelity_title(report), title_justify="left")
    for column in FIDELITY_COLUMNS:
        table.add_column(column, justify="left" if column == "output" else "right")
    for row in fidelity_rows(report):
        table.add_row(*row)
    return table


def fidelity_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per model output, in the order of FIDELITY_COLUMNS."""
    rows = []
    for name, stats in report["validation"]["outputs"].items():
        accuracy = "-"
        if stats.get("accuracy_original") is not None:
            accuracy = f"{stats['accuracy_original']:.4f} → {stats['accuracy_result']:.4f}"
        agree = stats.get("top1_agreement")
        rows.append(
            (
                name,
                f"{stats['max_abs']:.3g}",
                f"{stats['rel_l2']:.3g}",
                f"{stats['cosine']:.6f}",
                "-" if agree is None else f"{agree:.4f}",
                accuracy,
            )
        )
    return rows


def pass_lines(report: dict[str, Any]) -> list[str]:
    """One line per pass: what it rewrote and what it skipped."""
    lines = []
    for entry in report["passes"]:
        lines.append(f"pass {entry['name']}: {pass_outcome(entry)}")
        lines.extend(f"  {note}" for note in pass_notes(entry))
    return lines


def pass_outcome(entry: dict[str, Any]) -> str:
    """What a pass did, in one phrase: counts per status, changed or not, seconds."""
    counts: dict[str, int] = {}
    for record in entry["records"]:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    done = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no nodes"
    changed = "changed the model" if entry["changed"] else "left the model unchanged"
    return f"{done}; {changed} ({entry['seconds']:.2f} s)"


def pass_notes(entry: dict[str, Any]) -> list[str]:
    """The pass summary's warning, notes and refit line, each prefixed with its kind."""
    summary = entry.get("summary") or {}
    lines = []
    if summary.get("note"):
        lines.append(f"warning: {summary['note']}")
    notes = summary.get("notes") or []
    for note in [notes] if isinstance(notes, str) else notes:
        lines.append(f"note: {note}")
    if isinstance(summary.get("refit"), str):
        lines.append(f"refit: {summary['refit']}")
    return lines


def verdict_line(report: dict[str, Any]) -> str:
    """The run's verdict in one line ("" for reports made before verdicts)."""
    verdict = report.get("verdict")
    return f"verdict: {verdict['text']}" if verdict else ""


def run_line(report: dict[str, Any]) -> str:
    """The tool's own wall time and peak memory ("" for reports made before they were kept)."""
    resources = report.get("resources")
    if not resources:
        return ""
    line = f"this run: {resources['wall_seconds']:.1f} s wall time"
    if resources.get("peak_memory_bytes") is not None:
        line += f", peak memory {human(resources['peak_memory_bytes'])}B"
    return line


def warning_lines(report: dict[str, Any]) -> list[str]:
    """The run's warnings, each prefixed `warning: `."""
    return [f"warning: {text}" for text in report.get("warnings") or []]
