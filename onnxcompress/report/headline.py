"""The head of the report, under the verdict: the before → after a user decides on — latency,
file size, MACs, parameters and, when validated, accuracy or agreement with its interval."""

from __future__ import annotations

from typing import Any

from onnxcompress.report.terminal import figure_row, latency_row
from onnxcompress.verdict import accuracy_change, share_text

HEADLINE_COLUMNS = ("", "before", "after", "change")


def headline_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, before, after, change) as text, in the order of HEADLINE_COLUMNS."""
    before, after = report["before"], report["after"]
    rows = [
        latency_row(report),
        figure_row("file size", report["input_bytes"], report["output_bytes"], "B"),
        figure_row("MACs", before["total_macs"], after["total_macs"]),
        figure_row("parameters", before["total_params"], after["total_params"]),
    ]
    return rows + _fidelity_rows(report.get("verdict") or {})


def _fidelity_rows(verdict: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Accuracy (with labels) and agreement with the original's predictions, each with its
    interval; for outputs that are not class scores, the worst relative L2. None unvalidated."""
    rows = []
    if "accuracy_result" in verdict:
        original = f"{100 * verdict['accuracy_original']:.1f}%"
        result = share_text(verdict, "accuracy_result")
        rows.append(("top-1 accuracy", original, result, accuracy_change(verdict)))
    if "top1_agreement" in verdict:
        agreement = share_text(verdict, "top1_agreement")
        rows.append(("top-1 agreement with the original", "", agreement, ""))
    if not rows and "worst_rel_l2" in verdict:
        rows.append(("worst relative L2 of the outputs", "", f"{verdict['worst_rel_l2']:.3g}", ""))
    return rows
