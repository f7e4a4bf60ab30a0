"""`blocks`: remove whole residual blocks whose shortcut is the identity, the least damaging
first, and refit the convs and linear layers after them on calibration data
(`onnxcompress.residual_blocks`).

Per-layer rewrites keep every op; on small models at batch 1 with a thread pool much of the
time is the per-op cost of handing work to the pool, which only fewer ops remove (see
docs/decisions.md#autooptionsblocks). Each block's damage is measured alone: the model
without it, refit on `ranking_samples` calibration samples, against the original's outputs
on the calibration data. Blocks are then removed together, least damaging first, and the
result refit on all the calibration data. Damage that blocks do together is not measured
before they are removed: the whole-model validation says what the run cost."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxcompress import graph, residual_blocks
from onnxcompress.errors import CompressError
from onnxcompress.layers import named_copy
from onnxcompress.passkit import (
    NodeRecord,
    PassContext,
    PassResult,
    comma_list,
    first_samples,
    option,
)
from onnxcompress.registry import register


@dataclass(frozen=True)
class BlocksOptions:
    count: int = option(1, "remove this many identity blocks, the least damaging first")
    names: str = option(
        "", "comma-separated Add node names of the blocks to remove, instead of ranking them"
    )
    refit: bool = option(True, "refit the layers after the removed blocks on calibration data")
    ranking_samples: int = option(128, "calibration samples each block's ranking refit uses")

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if self.ranking_samples < 1:
            raise ValueError(f"ranking_samples must be >= 1, got {self.ranking_samples}")


@register(
    "blocks",
    BlocksOptions,
    "remove identity residual blocks, least damaging first; refit",
    lossy=True,
)
def blocks(model: onnx.ModelProto, options: BlocksOptions, context: PassContext) -> PassResult:
    model = named_copy(model)  # blocks and the layers refit after them are found by node name
    # Weights in Constant nodes (paddle2onnx) become initializers, which a refit rewrites.
    graph.lift_constant_nodes(model)
    found = residual_blocks.identity_blocks(model)
    if not found:
        raise CompressError("blocks: the model has no residual block with an identity shortcut")
    if options.names:
        chosen, damage = _named(found, comma_list(options.names)), {}
    else:
        if options.count > len(found):
            raise CompressError(
                f"blocks: count={options.count}, but the model has {len(found)} identity blocks"
            )
        if not context.calibration:
            raise CompressError(
                "blocks: ranking blocks needs calibration data (--images or --data); "
                "or name them with names=..."
            )
        sample = first_samples(context.calibration, options.ranking_samples)
        damage = residual_blocks.damage_alone(model, found, context, sample, options.refit)
        chosen = sorted(found, key=lambda b: damage[b.add])[: options.count]
    result = residual_blocks.without_blocks(model, chosen)
    refit = {"layers": 0}
    if options.refit and context.calibration:
        result, refit = residual_blocks.refit_after(model, result, context)
    records = _records(model, found, chosen, damage)
    summary = {
        "blocks": {"found": len(found), "removed": [b.add for b in chosen], "refit": refit},
        "notes": _note(model, result, chosen, refit),
    }
    return PassResult(result, True, records, summary)


def _named(found: list[residual_blocks.Block], names: list[str]) -> list[residual_blocks.Block]:
    by_name = {block.add: block for block in found}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise CompressError(
            f"blocks: {', '.join(unknown)} is not an identity block's Add; "
            f"they are: {', '.join(by_name)}"
        )
    return [by_name[name] for name in dict.fromkeys(names)]


def _records(model, found, chosen, damage: dict[str, float]) -> list[NodeRecord]:
    """One record per identity block: removed (its branch's nodes and weights) or kept."""
    weights = graph.constant_tensors(model)
    records = []
    for block in found:
        details = {"rel_l2_alone": damage[block.add]} if block.add in damage else {}
        if block not in chosen:
            records.append(NodeRecord(block.add, "Add", "skipped", "kept", details=details))
            continue
        gone = residual_blocks.removed_nodes(model, [block])
        params = sum(int(weights[n].size) for node in gone for n in node.input if n in weights)
        details["nodes_removed"] = [node.name for node in gone]
        records.append(
            NodeRecord(block.add, "Add", "rewritten", "block removed", params, 0, details=details)
        )
    return records


def _note(model, result, chosen, refit: dict) -> str:
    removed = len(model.graph.node) - len(result.graph.node)
    text = f"removed {len(chosen)} block(s), {removed} of {len(model.graph.node)} nodes"
    if refit.get("layers"):
        return f"{text}; {refit['layers']} layers after them refit"
    return f"{text}; no refit (no calibration data or refit=false)"
