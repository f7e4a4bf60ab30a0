"""What block-wise distillation did, in the pass's words: a report per block, one record
per node of each block, and the run's summary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.passkit import NodeRecord
from onnxcompress.train.student_blocks import StudentBlock


@dataclass
class BlockReport:
    """What block-wise distillation did with one block: `trained` when its best held-out
    weights beat its start and went into the student, else `reason` says why not."""

    name: str
    nodes: list[str]
    weights: list[str]
    steps: int = 0
    seconds: float = 0.0
    loss_before: float | None = None
    loss_after: float | None = None
    trained: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        found = {
            "block": self.name,
            "nodes": len(self.nodes),
            "steps": self.steps,
            "seconds": self.seconds,
            "trained": self.trained,
        }
        if self.loss_before is not None:
            found["held_out_loss_before"] = round(self.loss_before, 6)
            found["held_out_loss_after"] = round(self.loss_after, 6)
        if self.reason:
            found["reason"] = self.reason
        return found


def node_labels(student: onnx.ModelProto, block: StudentBlock) -> list[str]:
    """The block's nodes by name (a nameless one by its first output)."""
    nodes = [student.graph.node[index] for index in block.nodes]
    return [node.name or node.output[0] for node in nodes]


def block_records(
    student: onnx.ModelProto, blocks: list[StudentBlock], reports: list[BlockReport], kept: bool
) -> list[NodeRecord]:
    """A record per node of a block that reads the block's trainable weights (each node of
    a block without any): rewritten when the block trained and the run's result is `kept`,
    else skipped with the block's reason."""
    sizes = {init.name: int(np.prod(init.dims)) for init in student.graph.initializer}
    records = []
    for block, report in zip(blocks, reports, strict=True):
        nodes = [student.graph.node[index] for index in block.nodes]
        weighted = [
            node for node in nodes if report.weights and set(node.input) & set(report.weights)
        ]
        for node in weighted or nodes:
            label = node.name or node.output[0]
            if report.trained and kept:
                mine = sorted(name for name in node.input if name in report.weights)
                params = sum(sizes.get(name, 0) for name in mine)
                records.append(
                    NodeRecord(label, node.op_type, "rewritten", params_before=params,
                               params_after=params, details={"block": block.name, "weights": mine})
                )  # fmt: skip
            else:
                why = report.reason if not report.trained else "the run's result was not kept"
                records.append(
                    NodeRecord(label, node.op_type, "skipped", f"block {block.name}: {why}")
                )
    return records


def block_summary(mode: str, done, end_to_end, losses, kept: bool, notes: list[str]) -> dict:
    """The run in the summary's words: the block phase (`done`, a torch_blockwise
    BlocksOutcome), the end-to-end phase's (outcome, summary) nested under `end_to_end` (None
    without one), and the model's held-out output loss before and after (None when its
    outputs are not one row per sample), the later one only if the result is `kept`."""
    before, after = losses
    whole = end_to_end[0] if end_to_end else None
    summary = {
        "blockwise": mode,
        "steps": done.steps + (whole.steps if whole else 0),
        "seconds": round(done.seconds + (whole.seconds if whole else 0), 2),
        "block_steps": done.steps,
        "block_seconds": done.seconds,
        "blocks": [report.to_dict() for report in done.reports],
        "blocks_trained": sum(report.trained for report in done.reports),
        "trained_tensors": len({w for r in done.reports if r.trained for w in r.weights}),
        "held_out_loss_before": _rounded(before),
        "held_out_loss_after": _rounded(after if kept else before),
        "stopped_by": done.stopped_by or (whole.stopped_by if whole else None),
    }
    if end_to_end:
        summary["end_to_end"] = end_to_end[1]
    if summary["stopped_by"]:
        steps, why = summary["steps"], summary["stopped_by"]
        notes.append(f"stopped ({why}) after {steps} steps; best kept")
    if before is None:
        notes.append("outputs not one row per sample: the model's held-out loss is not measured")
    if not summary["blocks_trained"] and not (whole and whole.model is not None):
        notes.append("no training beat its start on held-out samples: model unchanged")
    elif not kept:
        trained = "" if after is None else f" ({before:.4g} -> {after:.4g})"
        notes.append(f"training did not lower the model's held-out loss{trained}: model unchanged")
    if notes:
        summary["note"] = "; ".join(notes)
    return summary


def _rounded(loss: float | None) -> float | None:
    return None if loss is None else round(loss, 6)


def merged_records(first: list[NodeRecord], then: list[NodeRecord]) -> list[NodeRecord]:
    """One record per node from two phases' records: rewritten if either phase rewrote it."""
    by_node = {record.node: record for record in first}
    for record in then:
        mine = by_node.get(record.node)
        if mine is None or mine.status != "rewritten":
            by_node[record.node] = record
        elif record.status == "rewritten":
            mine.details["end_to_end"] = True
    return list(by_node.values())
