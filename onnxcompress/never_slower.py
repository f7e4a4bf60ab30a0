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
    rewrites are built here once and kept in `built`."""
    constants = graph.constant_tensors(model)
    probe = getattr(method, "probe", None)
    kept, reverted = [], []
    for layer, candidate in track(context.progress, "timing layers", chosen):
        if probe is not None:
            rewrite = probe(layer, candidate, namer)
        else:
            rewrite = built[layer.name] = method.build(layer, candidate, namer)
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


def check_target_after_reverts(summary: dict, records: list[NodeRecord], total_macs: int) -> None:
    """Reverted (slower) layers give back MACs the plan had counted on: say in `summary` if
    that misses its target."""
    target = summary.get("target_macs")
    returned = sum(r.macs_before - r.macs_after for r in records if r.status == "reverted")
    if target is None or not returned:
        return
    ratio = summary["planned_macs_ratio"] + returned / max(1, total_macs)
    if ratio > target + 1e-9:
        summary["target_reached"] = False
        summary.setdefault(
            "note",
            f"target {target:.2f} missed: {ratio:.3f} of MACs after reverting layers "
            "that were not faster",
        )
