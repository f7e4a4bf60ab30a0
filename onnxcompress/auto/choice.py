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
    return best_round_and_why(rounds, target, max_error)[0]


def best_round_and_why(
    rounds: list[dict], target: float | None, max_error: float | None = None
) -> tuple[int, str]:
    """`best_round`, and why it is the one, in words for the report."""
    rounds_left = [i for i, r in enumerate(rounds) if not failed_whole(r)]
    usable = [i for i in rounds_left if not breaks(rounds[i], max_error)]
    passed_over = []
    if len(rounds_left) < len(rounds):
        passed_over.append(f"{_plans(len(rounds) - len(rounds_left))} failed the tolerance")
    if usable and len(usable) < len(rounds_left):
        broken = _plans(len(rounds_left) - len(usable))
        passed_over.append(f"{broken} breaking the outputs passed over")
    elif rounds_left and not usable:
        passed_over.append(f"every plan breaks the outputs (relative L2 > {max_error:g})")
    rounds_left = usable or rounds_left
    candidates = [
        i for i in rounds_left
        if target is None or rounds[i]["latency_ratio"] <= target + LATENCY_SLACK
    ]  # fmt: skip
    where = "" if target is None else f" on the latency target {target:g}"
    if not candidates:  # none on target
        fastest = min(rounds[i]["latency_ratio"] for i in rounds_left)
        candidates = [
            i for i in rounds_left if rounds[i]["latency_ratio"] <= fastest + MISSED_TIE
        ]  # fmt: skip
        where = (
            f" within {MISSED_TIE:g} of the fastest ({fastest:.3f}), as none met the latency "
            f"target {target:g}"
        )
    chosen = min(
        candidates, key=lambda i: (rounds[i].get("rel_l2", 0.0), -(rounds[i]["budget"] or 0.0))
    )
    measured = any("rel_l2" in rounds[i] for i in candidates)
    best = "the least output error" if measured else "the largest budget (no error measured)"
    which = f"{best} of the {len(candidates)} plans" if len(candidates) > 1 else "the only plan"
    return chosen, "; ".join([f"{which}{where}{_figures(rounds[chosen])}", *passed_over])


def _plans(count: int) -> str:
    return f"{count} plan" if count == 1 else f"{count} plans"


def _figures(round_: dict) -> str:
    figures = []
    if round_.get("latency_ratio") is not None:
        figures.append(f"latency {round_['latency_ratio']:.3f} of the original's")
    if round_.get("rel_l2") is not None:
        figures.append(f"relative L2 {round_['rel_l2']:.3g}")
    return f" ({', '.join(figures)})" if figures else ""


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
