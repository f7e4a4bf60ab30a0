"""The run's report: a before → after table for the terminal and a JSON file with every figure."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from onnxcompress.tables import human


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report atomically (temp file + rename), as every output of the tool."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(report, fh, indent=2, default=_json_default)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _size(value: float | None, unit: str = "") -> str:
    return "-" if value is None else human(value) + unit


def _ratio(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.3f}×"


def summary_table(report: dict[str, Any]) -> Table:
    """Before → after: MACs, parameters, bytes on disk, latency, then fidelity per output."""
    before, after = report["before"], report["after"]
    table = Table(title=f"{report['input']} → {report['output']}", title_justify="left")
    for column in ("", "before", "after", "after / before"):
        table.add_column(column, justify="right" if column else "left")
    rows = [
        ("MACs", before["total_macs"], after["total_macs"], ""),
        ("parameters", before["total_params"], after["total_params"], ""),
        ("weight bytes", before["weight_bytes"], after["weight_bytes"], "B"),
        ("file bytes", report["input_bytes"], report["output_bytes"], "B"),
    ]
    sizes = report.get("sizes") or {}
    if "original" in sizes and "result" in sizes:
        for label, key in (
            ("plain .onnx bytes", "bytes"),
            ("  gzip -9", "gzip9"),
            ("  zstd -19", "zstd19"),
        ):
            rows.append((label, sizes["original"][key], sizes["result"][key], "B"))
    for label, b, a, unit in rows:
        table.add_row(label, _size(b, unit), _size(a, unit), _ratio(b, a))
    bench = report.get("benchmark")
    if bench:
        b, a = bench["original"]["median_ms"], bench["result"]["median_ms"]
        table.add_row(
            f"latency (median, {bench['original']['threads']} threads)",
            f"{b:.3f} ms",
            f"{a:.3f} ms",
            f"{a / b:.3f}× (speedup {bench['speedup']:.2f}×)",
        )
    else:
        table.add_row("latency", "not measured (--no-bench)", "", "")
    return table


def fidelity_table(report: dict[str, Any]) -> Table:
    validation = report["validation"]
    table = Table(
        title=f"fidelity on {validation['samples']} samples ({report['calibration']})",
        title_justify="left",
    )
    for column in ("output", "max abs", "rel L2", "cosine", "top-1 agree", "accuracy"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for name, stats in validation["outputs"].items():
        accuracy = "-"
        if stats.get("accuracy_original") is not None:
            accuracy = f"{stats['accuracy_original']:.4f} → {stats['accuracy_result']:.4f}"
        agree = stats.get("top1_agreement")
        table.add_row(
            name,
            f"{stats['max_abs']:.3g}",
            f"{stats['rel_l2']:.3g}",
            f"{stats['cosine']:.6f}",
            "-" if agree is None else f"{agree:.4f}",
            accuracy,
        )
    return table


def pass_lines(report: dict[str, Any]) -> list[str]:
    """One line per pass: what it rewrote and what it skipped."""
    lines = []
    for entry in report["passes"]:
        counts: dict[str, int] = {}
        for record in entry["records"]:
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        done = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no nodes"
        changed = "changed the model" if entry["changed"] else "left the model unchanged"
        lines.append(f"pass {entry['name']}: {done}; {changed} ({entry['seconds']:.2f} s)")
        summary = entry.get("summary") or {}
        if summary.get("note"):
            lines.append(f"  warning: {summary['note']}")
        notes = summary.get("notes") or []
        for note in [notes] if isinstance(notes, str) else notes:
            lines.append(f"  note: {note}")
        if isinstance(summary.get("refit"), str):
            lines.append(f"  refit: {summary['refit']}")
    return lines
