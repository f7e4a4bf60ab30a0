"""How many channels each group keeps: one ratio for every group, or a MACs target met either
by the smallest uniform ratio that reaches it (bisection) or, when per-group damage curves
exist (refit-aware data scores), by greedy moves with the least damage per MAC saved. MACs are
always measured on the pruned graph (`analyse`), never assumed."""

from __future__ import annotations

import numpy as np

from onnxcompress.analyse import analyse
from onnxcompress.channels.groups import ChannelGraph
from onnxcompress.channels.importance import allowed_counts, greedy_moves, keep_mask, kept_count
from onnxcompress.channels.surgery import prune_channels

MAX_RATIO = 0.99  # the bisection's upper end; kept counts never fall below one unit anyway
BISECTION_STEPS = 14


def uniform_counts(
    channel_graph: ChannelGraph, groups: list[int], ratio: float, round_to: int
) -> dict[int, int]:
    found = channel_graph.groups
    return {g: kept_count(found[g].channels, ratio, round_to, found[g].blocks) for g in groups}


def masks_for(
    channel_graph: ChannelGraph, scores: dict[int, np.ndarray], counts: dict[int, int]
) -> dict[int, np.ndarray]:
    """Keep-masks of the groups that lose channels (the highest scores stay)."""
    masks = {}
    for g, count in counts.items():
        group = channel_graph.groups[g]
        if count < group.channels:
            masks[g] = keep_mask(scores[g], count, group.blocks, group.keep_ranges)
    return masks


class MacsMeter:
    """Total MACs of the model pruned to given counts (cached by counts)."""

    def __init__(self, model, channel_graph, scores, input_shapes, total: int):
        self.model, self.graph, self.scores = model, channel_graph, scores
        self.shapes, self.total, self.cache = input_shapes, total, {}

    def __call__(self, counts: dict[int, int]) -> int:
        key = tuple(sorted(counts.items()))
        if key not in self.cache:
            masks = masks_for(self.graph, self.scores, counts)
            pruned = prune_channels(self.model, self.graph, masks) if masks else self.model
            self.cache[key] = self.total if not masks else analyse(pruned, self.shapes).total_macs
        return self.cache[key]


def bisect_ratio(meter: MacsMeter, groups: list[int], goal: float, round_to: int):
    """The smallest uniform ratio whose pruned model has at most `goal` MACs, and whether it
    was reachable at all."""

    def macs(ratio: float) -> int:
        return meter(uniform_counts(meter.graph, groups, ratio, round_to))

    if macs(MAX_RATIO) > goal:
        return MAX_RATIO, False
    low, high = 0.0, MAX_RATIO
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (low, middle) if macs(middle) <= goal else (middle, high)
    return high, True


def greedy_counts(
    meter: MacsMeter,
    groups: list[int],
    damage: dict[int, np.ndarray],
    goal: float,
    round_to: int,
) -> tuple[dict[int, int], bool]:
    """Kept counts from greedy moves (least damage per MAC first), the shortest run of moves
    that reaches `goal` MACs (found by bisection on the number of moves), and whether the goal
    was reachable."""
    found = meter.graph.groups
    allowed = {g: allowed_counts(found[g].channels, round_to, found[g].blocks) for g in groups}
    per_channel = {}
    for g in groups:
        if len(allowed[g]) > 1:  # MACs one step of this group alone saves, per channel
            step = {g: allowed[g][1]}
            per_channel[g] = (meter.total - meter(step)) / (allowed[g][0] - allowed[g][1])
    moves = greedy_moves(damage, allowed, per_channel)

    def counts_after(steps: int) -> dict[int, int]:
        counts = {g: allowed[g][0] for g in groups}
        for g, kept in moves[:steps]:
            counts[g] = kept
        return counts

    if meter(counts_after(len(moves))) > goal:
        return counts_after(len(moves)), False
    low, high = 0, len(moves)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if meter(counts_after(middle)) <= goal else (middle + 1, high)
    return _undo_spare_moves(meter, moves[:high], counts_after(high), allowed, goal), True


def _undo_spare_moves(meter, applied, counts, allowed, goal) -> dict[int, int]:
    """The last move that reached the goal may overshoot it: give back each group's latest
    move (the costliest first, in reverse greedy order) whenever the goal still holds."""
    counts = dict(counts)
    for g, kept in reversed(applied):
        if counts[g] != kept:
            continue  # a later move of this group was kept, so this one stays
        previous = allowed[g][allowed[g].index(kept) - 1]
        trial = {**counts, g: previous}
        if meter(trial) <= goal:
            counts = trial
    return counts
