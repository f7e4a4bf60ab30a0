"""`channels`: structured channel pruning that really shrinks the graph. Whole output channels
of Conv/Gemm/MatMul/ConvTranspose go, with the matching input channels of every consumer and
the per-channel parameters in between; coupled channels (residual adds, depthwise convs,
Concat, Split, Flatten → Gemm) go together, as one dependency group (methods.md §4). Channels
are ranked by weight norm or, with calibration data, by their contribution to the consumers'
outputs; consumers are then refit by least squares on the calibration data."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.analyse import ModelAnalysis, analyse
from onnxcompress.channels.budget import (
    MacsMeter,
    bisect_ratio,
    greedy_counts,
    masks_for,
    uniform_counts,
)
from onnxcompress.channels.graph import build_channel_graph
from onnxcompress.channels.groups import ChannelGraph, Group, label
from onnxcompress.channels.importance import ranges_kept
from onnxcompress.channels.mean_compensation import compensate_means
from onnxcompress.channels.refit import refit_consumers
from onnxcompress.channels.scoring import (
    data_scores,
    layer_weights,
    refit_aware_scores,
    weight_scores,
)
from onnxcompress.channels.sensitivity import output_scaled_damage
from onnxcompress.channels.surgery import prune_channels
from onnxcompress.default_budget import DefaultBudget
from onnxcompress.errors import CompressError
from onnxcompress.input_checks import require_finite_weights
from onnxcompress.passkit import NodeRecord, PassContext, PassResult, comma_list, option
from onnxcompress.registry import register

log = logging.getLogger(__name__)

# Without calibration data no default ratio: weight-only pruning lost over 5 top-1 points on a
# shared model at every ratio measured (docs/decisions.md#weight-only-default-budgets).
DEFAULT_BUDGET = DefaultBudget("ratio", 0.3, None)
IMPORTANCE = ("auto", "l1", "l2", "data", "output")
ALLOCATION = ("uniform", "greedy")
REFIT_AT = ("output", "add", "relu")


@dataclass(frozen=True)
class ChannelsOptions:
    ratio: float | None = option(
        None,
        "fraction of each prunable group's channels removed when target_macs is not given "
        f"({DEFAULT_BUDGET.help()})",
    )
    target_macs: float | None = option(
        None, "keep at most this fraction of the model's MACs instead of a fixed ratio"
    )
    allocation: str = option(
        "uniform",
        "with target_macs: uniform (the smallest ratio, the same in every group, that meets it; "
        "bisection) | greedy (least refit error per MAC saved first, each group's errors "
        "rescaled to the model outputs' error when it alone is pruned to half; needs "
        "importance=output)",
    )
    round_to: int = option(
        8, "kept channel counts are multiples of this (unless the group is smaller)"
    )
    importance: str = option(
        "auto",
        "l1 | l2 (weight norms) | data (activation × weight contribution, calibration) | output "
        "(the set whose refit consumers' outputs suffer least; calibration and refit) | auto: "
        "output with data and refit, data with data alone, else l2",
    )
    refit: bool = option(True, "refit the consumers' weights and biases on calibration data")
    refit_at: str = option(
        "relu",
        "where a refit consumer must match the original: output (its own) | add (the residual "
        "Add it feeds, making up for error on the other path) | relu (add, and only what a "
        "following Relu lets through)",
    )
    skip: str = option(
        "", "comma-separated fnmatch patterns of node names whose groups stay intact"
    )
    max_refit_features: int = option(
        4608, "a k×k Conv consumer with more input features than this gets only its bias refit"
    )

    def __post_init__(self) -> None:
        if self.ratio is not None and self.target_macs is not None:
            raise ValueError("give ratio or target_macs, not both")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise ValueError(f"target_macs must be in (0, 1], got {self.target_macs}")
        if self.round_to < 1 or self.max_refit_features < 1:
            raise ValueError("round_to and max_refit_features must be >= 1")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}")
        if self.refit_at not in REFIT_AT:
            raise ValueError(f"refit_at must be one of {', '.join(REFIT_AT)}")
        if self.allocation not in ALLOCATION:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATION)}")


@register(
    "channels",
    ChannelsOptions,
    "structured channel pruning across coupled layers (residuals, depthwise, Concat, Flatten)",
    lossy=True,
)
def channels(model: onnx.ModelProto, options: ChannelsOptions, context: PassContext) -> PassResult:
    importance = _importance(options, context)
    ratio, note = options.ratio, ""
    if ratio is None and options.target_macs is None:
        ratio, note = DEFAULT_BUDGET.choose(bool(context.calibration), "channels")
    channel_graph = build_channel_graph(model, context.input_shapes)
    candidates, skipped = _candidates(model, channel_graph, options)
    before = analyse(model, context.input_shapes)
    if options.target_macs is None:  # counts do not depend on scores: score only what shrinks
        counts = uniform_counts(channel_graph, candidates, ratio, options.round_to)
        budget = f"ratio {ratio} in every group"
        shrinking = [g for g in candidates if counts[g] < channel_graph.groups[g].channels]
        scores, _ = _scores(model, channel_graph, shrinking, importance, context, options)
    else:
        scores, damage = _scores(model, channel_graph, candidates, importance, context, options)
        counts, budget = _budget(model, channel_graph, scores, damage, options, context, before)
    keep, skipped = _keep(channel_graph, scores, counts, options, skipped)
    if not keep:
        records = _records(channel_graph, model, {}, skipped, before, before)
        summary = _summary(records, before, before, importance, budget, note=note)
        return PassResult(model=_copy(model), changed=False, records=records, summary=summary)
    pruned = prune_channels(model, channel_graph, keep)
    refits = {}
    if options.refit and context.calibration:
        refits = _refit(model, pruned, channel_graph, keep, context, options)
    elif context.calibration:
        refits = compensate_means(model, pruned, channel_graph, keep, context)
    after = analyse(pruned, context.input_shapes)
    records = _records(channel_graph, model, keep, skipped, before, after, refits)
    summary = _summary(records, before, after, importance, budget, refits, note)
    return PassResult(
        model=graph.cleanup_and_sort(pruned), changed=True, records=records, summary=summary
    )


def _refit(model, pruned, channel_graph, keep, context, options) -> dict:
    """Refit the consumers; those the refit cannot take get a mean shift of their bias."""
    refits = refit_consumers(
        model,
        pruned,
        channel_graph,
        keep,
        context,
        options.max_refit_features,
        options.refit_at,
    )
    taken = {name for name, done in refits.items() if done.get("mode") != "none"}
    shifted = compensate_means(model, pruned, channel_graph, keep, context, skip=taken)
    for name, done in shifted.items():
        refits[name] = {**refits.get(name, {}), **done}
    return refits


def _importance(options: ChannelsOptions, context: PassContext) -> str:
    importance = options.importance
    if importance == "auto":  # output beats data at half the MACs (docs/results.md)
        importance = ("output" if options.refit else "data") if context.calibration else "l2"
    if importance in ("data", "output") and not context.calibration:
        raise CompressError(
            f"channels.importance={importance} needs calibration data (--data/--images)"
        )
    if importance == "output" and not options.refit:
        raise CompressError("channels.importance=output needs refit (it ranks refit errors)")
    greedy = options.target_macs is not None and options.allocation != "uniform"
    if greedy and importance != "output":
        raise CompressError(
            "channels.allocation=greedy needs importance=output (or auto) with refit and "
            "calibration data"
        )
    return importance


def _candidates(model, channel_graph: ChannelGraph, options) -> tuple[list[int], dict[int, str]]:
    """Groups that may be pruned, and why the others may not."""
    patterns = comma_list(options.skip)
    candidates, skipped = [], {}
    for group in channel_graph.groups:
        names = [label(model.graph.node[n]) for n in sorted(group.nodes)]
        hit = next((p for p in patterns if any(fnmatch.fnmatch(n, p) for n in names)), None)
        if not group.prunable:
            skipped[group.id] = _reason(group)
        elif hit is not None:
            skipped[group.id] = f"a node matches skip pattern '{hit}'"
        else:
            candidates.append(group.id)
    return candidates, skipped


def _reason(group: Group) -> str:
    more = len(group.reasons) - 3
    return "; ".join(group.reasons[:3]) + (f"; and {more} more" if more > 0 else "")


def _scores(model, channel_graph, candidates, importance, context, options):
    """Per group: channel scores, and (refit-aware data scores only) damage curves."""
    if not candidates:
        return {}, None
    require_finite_weights(layer_weights(model, channel_graph, candidates), "channels")
    if importance == "output":
        return refit_aware_scores(
            model, channel_graph, candidates, context, options.max_refit_features
        )
    if importance == "data":
        return data_scores(model, channel_graph, candidates, context), None
    p = 1 if importance == "l1" else 2
    return weight_scores(model, channel_graph, candidates, p=p), None


def _budget(model, channel_graph, scores, damage, options, context, before: ModelAnalysis):
    """Kept channels per candidate group for `target_macs`, and the budget in words."""
    candidates = list(scores)
    goal = options.target_macs * before.total_macs
    meter = MacsMeter(model, channel_graph, scores, context.input_shapes, before.total_macs)
    target = f"target_macs {options.target_macs}"
    if options.allocation == "greedy":
        refit_options = (options.max_refit_features, options.refit_at)
        damage = output_scaled_damage(
            model, channel_graph, scores, damage, context, options.round_to, refit_options
        )
        counts, met = greedy_counts(meter, candidates, damage, goal, options.round_to)
        how = "greedy: least output error per MAC saved first"
    else:
        ratio, met = bisect_ratio(meter, candidates, goal, options.round_to)
        counts = uniform_counts(channel_graph, candidates, ratio, options.round_to)
        how = f"uniform ratio {ratio:.4f} found by bisection"
    if not met:
        return counts, f"{target}: unreachable, every group pruned as far as it goes ({how})"
    return counts, f"{target}: {how}"


def _keep(channel_graph, scores, counts, options, skipped):
    masks = masks_for(channel_graph, scores, counts)
    skipped = dict(skipped)
    for g, count in counts.items():
        group = channel_graph.groups[g]
        if g not in masks:
            skipped[g] = (
                f"nothing to remove: keeping {count} of {group.channels} channels "
                f"(round_to {options.round_to})"
            )
        elif not ranges_kept(masks[g], group.keep_ranges):
            skipped[g] = "cannot keep a channel in every Split/Slice range"
            del masks[g]
    return masks, skipped


def _records(channel_graph, model, keep, skipped, before, after, refits=None) -> list[NodeRecord]:
    refits = refits or {}
    records = []
    for group in channel_graph.groups:
        nodes = sorted(group.nodes)
        ops = "+".join(sorted({model.graph.node[p].op_type for p in group.producers}))
        details = {
            "channels_before": group.channels,
            "producers": [label(model.graph.node[n]) for n in group.producers],
            "consumers": [label(model.graph.node[n]) for n in group.consumers],
        }
        if group.id not in keep:
            reason = skipped.get(group.id, "not pruned")
            records.append(NodeRecord(group.name, ops, "skipped", reason, details=details))
            continue
        kept = int(keep[group.id].sum())
        details["channels_after"] = kept
        details["removed"] = [int(c) for c in np.flatnonzero(~keep[group.id])]
        consumers = {label(model.graph.node[n]) for n in group.consumers}
        refit = {name: value for name, value in refits.items() if name in consumers}
        if refit:
            details["refit"] = refit
        records.append(
            NodeRecord(
                group.name,
                ops,
                "rewritten",
                f"{group.channels} → {kept} channels",
                params_before=sum(before.nodes[n].params for n in nodes),
                params_after=sum(after.nodes[n].params for n in nodes),
                macs_before=sum(before.nodes[n].macs for n in nodes),
                macs_after=sum(after.nodes[n].macs for n in nodes),
                details=details,
            )
        )
    return records


def _summary(records, before, after, importance, budget, refits=None, note="") -> dict:
    refits = refits or {}
    pruned = sum(r.status == "rewritten" for r in records)
    summary = {
        "groups": len(records),
        "pruned": pruned,
        "skipped": len(records) - pruned,
        "importance": importance,
        "budget": budget,
        "macs_before": before.total_macs,
        "macs_after": after.total_macs,
        "macs_kept": round(after.total_macs / max(before.total_macs, 1), 4),
        "params_before": before.total_params,
        "params_after": after.total_params,
    }
    if note:  # which default budget, and why
        summary["notes"] = [note]
    if refits:
        modes = [r.get("mode", "") for r in refits.values()]
        summary["refit"] = {
            "consumers": len(refits),
            "weights": sum(m == "weights+bias" for m in modes),
            "bias_only": sum(m == "bias only" for m in modes),
            "mean_shift": sum(m == "mean shift" for m in modes),
            "not_refit": sum(m not in ("weights+bias", "bias only", "mean shift") for m in modes),
        }
    return summary


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
