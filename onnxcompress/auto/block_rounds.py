"""auto's block rounds: the original with whole identity residual blocks removed, the least
damaging first, the layers after them refit. Per-layer plans keep every op, whose per-op cost
at batch 1 can be most of the time (see docs/decisions.md#autooptionsblocks)."""

from __future__ import annotations

from onnxcompress import residual_blocks
from onnxcompress.auto.choice import LATENCY_SLACK, breaks
from onnxcompress.auto.rounds import Rounds, Search
from onnxcompress.passkit import NodeRecord, first_samples, track


def block_rounds(search: Search, quantize, rounds: Rounds, max_error) -> dict | None:
    """One more block removed a round (each block's damage measured alone, the layers after
    it refit on the sensitivity samples; the layers after the removed ones refit on the
    calibration data), each measured in float and, with `quantize`, in int8, like every round.
    Stops at the first count with a round on target, or when the outputs break. What was
    measured (None for a model without such blocks)."""
    model, context, settings = search.model, search.context, search.settings
    found = residual_blocks.identity_blocks(model)
    if not found:
        return None
    sample = first_samples(context.calibration, settings.sensitivity_samples)
    damage = residual_blocks.damage_alone(model, found, context, sample)
    ranked = sorted(found, key=lambda block: damage[block.add])
    keep_all = search.original_built().plan
    for count in track(context.progress, "block removal rounds", range(1, len(ranked) + 1)):
        names = [block.add for block in ranked[:count]]
        dropped = residual_blocks.without_blocks(model, ranked[:count])
        dropped, refit = residual_blocks.refit_after(model, dropped, context)
        check = search.checker(dropped, "latency")
        why = search.checker.fails(check)
        if why:
            check["tolerance_failed"] = why
        rounds.add({"budget": None, "blocks": names, **check}, keep_all, dropped, refit, check, [])
        checks = [check]
        if quantize:
            built = rounds.built[-1]
            checks.append(search.int8_round(built, None, quantize, rounds))
            rounds[-1].update({"of": f"{count} block(s) removed", "blocks": names})
        on_target = any(
            c.get("latency_ratio", 1.0) <= settings.target + LATENCY_SLACK
            and "tolerance_failed" not in c
            for c in checks
        )
        if on_target or breaks(check, max_error):
            break
    return {"damage_alone": damage, "ranked": [block.add for block in ranked]}


def mark_removed(records: list[NodeRecord], summary: dict, model, removed: list[str]) -> None:
    """The layers that went with removed blocks: records and the summary's layer table say
    so (the plan kept them: it was not a per-layer choice)."""
    if not removed:
        return
    blocks = [b for b in residual_blocks.identity_blocks(model) if b.add in removed]
    gone = {node.name for node in residual_blocks.removed_nodes(model, blocks)}
    for record in records:
        if record.node in gone:
            record.status, record.reason = "rewritten", "removed with its residual block"
            record.params_after = record.macs_after = 0
            record.details = {"method": "removed"}
    for layer in summary["layers"]:
        if layer["node"] in gone:
            layer.update(method="removed", config={}, macs_after=0, params_after=0)
            layer.update(latency_ms_after=0.0, damage=None)
