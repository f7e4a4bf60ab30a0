"""The report on disk: one JSON file with every figure, or a folder with report.json,
report.md and report.html (with plots); written atomically, checked before the run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxcompress.errors import CompressError
from onnxcompress.io import output_file, write_bytes_atomic


@dataclass(frozen=True)
class ReportTarget:
    """Where the report goes: one JSON file, or a folder for report.json/.md/.html."""

    path: Path
    is_folder: bool


def report_target(raw: str | os.PathLike) -> ReportTarget:
    """Read a `--report` value: a folder when it exists as one, ends with a slash or lacks a
    `.json` suffix, else a JSON file. Checked before the run, so a typo costs no time; the
    folder itself is made when the report is written (its parent must exist)."""
    text = str(raw)
    path = Path(text)
    is_folder = text.endswith(("/", os.sep)) or path.is_dir() or path.suffix.lower() != ".json"
    parent = path.parent if str(path.parent) else Path(".")
    if is_folder and path.exists() and not path.is_dir():
        raise CompressError(f"--report {text}: a file of that name exists; give a folder or .json")
    if not parent.is_dir():
        raise CompressError(f"--report {text}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) and not (is_folder and path.is_dir()):
        raise CompressError(f"--report {text}: folder {parent} is not writable")
    names = ("report.json", "report.md", "report.html") if is_folder else ("",)
    for name in names:  # a FIFO or device there is refused now, not after the run
        output_file(path / name if name else path)
    return ReportTarget(path, is_folder)


def write_report(report: dict[str, Any], target: ReportTarget) -> list[Path]:
    """Write the report where `target` says; returns the files written."""
    if not target.is_folder:
        write_json(report, target.path)
        return [target.path]
    from onnxcompress.report.html import render_html
    from onnxcompress.report.markdown import render_markdown

    try:
        target.path.mkdir(exist_ok=True)
    except OSError as exc:
        raise CompressError(f"--report {target.path}: cannot make the folder: {exc}") from exc
    files = [target.path / name for name in ("report.json", "report.md", "report.html")]
    write_json(report, files[0])
    write_bytes_atomic(render_markdown(report).encode(), files[1])
    write_bytes_atomic(render_html(report).encode(), files[2])
    return files


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report atomically (temp file + rename), as every output of the tool."""
    text = json.dumps(report, indent=2, default=_json_default) + "\n"
    write_bytes_atomic(text.encode(), path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
