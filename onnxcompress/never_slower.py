"""The never-slower check of the factorization passes: its two options, the timing of each
rewritten layer alone against the original (those not `min_speedup` faster are reverted), and
whether the MAC target still holds once they are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxcompress import graph
from onnxcompress.auto import layer_timing as layer_timing
from onnxcompress.passkit import NodeRecord, PassContext, option, track

if TYPE_CHECKING:  # types only: the driver imports this module
    import onnx

    from onnxcompress.factorization import Candidate, Method
    from onnxcompress.layers import Namer


# Options every factorization pass declares (each in its own dataclass, in its own order).
def never_slower_option() -> Any:
    return option(True, "time each rewritten layer; revert those not faster")


def min_speedup_option() -> Any:
    return option(1.05, "a rewritten layer must be this much faster to stay")


def faster_only(
    model: onnx.ModelProto,
    chosen: list[tuple[Any, Candidate]],
    method: Method,
    namer: Namer,
    built: dict,
    min_speedup: float,
    context: PassContext,
) -> tuple[list[tuple[Any, Candidate]], list[NodeRecord]]:
    """The chosen (layer, candidate) pairs whose rewrite, timed alone against the original
    layer, is at least `min_speedup` faster, and a `reverted` record for each one left out.
    Timing needs only the rewrite's shapes, so a method with slow fits (cp) may `probe` with
    stand-in factors, and a layer that stays original never pays for its fit; other methods'
    rewrites are built here once and kept in `built`, by the candidate's id (a layer's rung may
    change when the budget is solved again)."""
    constants = graph.constant_tensors(model)
    probe = getattr(method, "probe", None)
    kept, reverted = [], []
    for layer, candidate in track(context.progress, "timing layers", chosen):
        if probe is not None:
            rewrite = probe(layer, candidate, namer)
        else:
            rewrite = built[id(candidate)] = method.build(layer, candidate, namer)
        timing = layer_timing.compare_layer(constants, layer, rewrite, context.threads)
        candidate.config["timing"] = timing
        if timing["speedup"] >= min_speedup:
            kept.append((layer, candidate))
            continue
        verdict = (
            f"{1 / timing['speedup']:.2f}× slower"
            if timing["speedup"] < 1
            else f"only {timing['speedup']:.2f}× faster"
        )
        reverted.append(
            NodeRecord(
                layer.name,
                layer.node.op_type,
                "reverted",
                f"reverted: {verdict} (min_speedup {min_speedup})",
                macs_before=layer.macs,
                macs_after=candidate.macs,
                details=dict(candidate.config),
            )
        )
    return kept, reverted


def check_target_after_reverts(summary: dict, records: list[NodeRecord]) -> None:
    """Layers put back as slower give back MACs; the budget is solved again among the others,
    and if the MACs the pass ends at still miss the target, `summary` says so in one line."""
    target = summary.get("target_macs")
    reverted = sum(r.status == "reverted" for r in records)
    if target is None or not reverted:
        return
    ratio = summary["macs_ratio"]
    summary["target_reached"] = ratio <= target + 1e-9
    if not summary["target_reached"]:
        solves = summary.get("budget_solves", 1)
        missed = (
            f"target {target:.2f} missed: {ratio:.3f} of MACs; {reverted} layers were put back "
            f"as not faster, and the budget solved {solves} times among the others could not "
            "make up for them"
        )
        summary["note"] = f"{missed}; {summary['note']}" if summary.get("note") else missed
