"""Which of auto's rounds is kept: on the latency target with the least output error, never a
whole-model round that failed the tolerance, never a broken plan while a working one is at
hand."""

from __future__ import annotations

# A whole model within this much of its latency target is on target (timing noise).
LATENCY_SLACK = 0.02
# With every round off target, rounds this close to the fastest count as equally fast, so
# timing noise does not cost a plan with far less error; see docs/decisions.md#missed_tie
MISSED_TIE = 0.05


def best_round(rounds: list[dict], target: float | None, max_error: float | None = None) -> int:
    """The round to keep: of those on the latency target (all, for other budgets), the one
    with the smallest measured output error (the largest budget when no data measured it);
    with none on target, the least error among those within MISSED_TIE of the fastest. An
    int8 round that failed the tolerance is out; so is one whose output error is over
    `max_error` while any other is left (a plan that breaks the outputs is not kept for speed
    while one that works is at hand)."""
    rounds_left = [i for i, r in enumerate(rounds) if not failed_whole(r)]
    usable = [i for i in rounds_left if not breaks(rounds[i], max_error)]
    rounds_left = usable or rounds_left
    candidates = [
        i for i in rounds_left
        if target is None or rounds[i]["latency_ratio"] <= target + LATENCY_SLACK
    ]  # fmt: skip
    if not candidates:  # none on target
        fastest = min(rounds[i]["latency_ratio"] for i in rounds_left)
        candidates = [
            i for i in rounds_left if rounds[i]["latency_ratio"] <= fastest + MISSED_TIE
        ]  # fmt: skip
    return min(
        candidates, key=lambda i: (rounds[i].get("rel_l2", 0.0), -(rounds[i]["budget"] or 0.0))
    )


def failed_whole(round_: dict) -> bool:
    """An int8 or block round that failed the user's tolerance: it is out (a float plan that
    fails it was backed off to the one recorded, which stays)."""
    return bool(round_.get("int8") or round_.get("blocks")) and "tolerance_failed" in round_


def breaks(round_: dict, max_error: float | None) -> bool:
    """Whether a round's measured output error is over `max_error` (never, without a bar)."""
    return max_error is not None and round_.get("rel_l2", 0.0) > max_error


def broken_faster(rounds: list[dict], chosen: int, max_error: float | None) -> dict | None:
    """The fastest round passed over for breaking the outputs, when it was faster than the
    kept one (what the user gave up by not loosening the tolerance)."""
    kept = rounds[chosen]
    if breaks(kept, max_error):
        return None
    broken = [
        r for r in rounds if breaks(r, max_error) and r["latency_ratio"] < kept["latency_ratio"]
    ]
    if not broken:
        return None
    fastest = min(broken, key=lambda r: r["latency_ratio"])
    return {"latency_ratio": fastest["latency_ratio"], "rel_l2": fastest["rel_l2"]}
