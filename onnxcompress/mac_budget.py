"""The MAC budget of the factorization passes: one rung of each layer's ladder (or the layer
kept) for the least total squared relative error within `target_macs` × the model's MACs, a
multiple-choice knapsack (maths.allocation) over the budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onnxcompress.errors import CompressError
from onnxcompress.maths import allocation as allocation

if TYPE_CHECKING:  # types only: the driver imports this module
    from onnxcompress.factorization import Candidate, DriverOptions

# Budget units for the knapsack: finer is closer to optimal, linear in time and memory.
BUDGET_STEPS = 4000


@dataclass
class LayerChoice:
    """A layer, its ladder of candidates (most MACs first) and the rung chosen."""

    layer: Any
    ladder: list[Candidate]
    index: int = -1  # -1: keep the original layer
    scale: float = 1.0  # output damage per unit of error² (output_sensitivity), 1: unmeasured

    @property
    def current(self) -> Candidate | None:
        return self.ladder[self.index] if self.index >= 0 else None

    @property
    def macs(self) -> int:
        return self.current.macs if self.current else self.layer.macs


def allocate(
    choices: list[LayerChoice], options: DriverOptions, total_macs: int, summary: dict
) -> None:
    """Pick one rung per layer (or keep it) with the least total squared relative error (of
    the weights, or on calibration data when the layers were whitened) such that the model's
    MACs stay within `target_macs` × the original: a multiple-choice knapsack, solved by
    dynamic programming over the MAC budget in `BUDGET_STEPS` units. Each option's MACs are
    rounded *up* to whole units, so the plan always meets the budget it claims. A target the
    user set that cannot be reached is refused; the passes' default target does what it can."""
    target = options.target_macs
    if not 0 < target <= 1:
        raise CompressError(f"target_macs={target}: expected a fraction in (0, 1]")
    fixed = total_macs - sum(choice.layer.macs for choice in choices)
    budget = target * total_macs - fixed
    cheapest = sum(choice.ladder[-1].macs for choice in choices)
    summary["target_macs"] = target
    if choices and budget < cheapest:
        best = (fixed + cheapest) / max(1, total_macs)
        if not options.default_target:
            # Every layer at its smallest rank would still miss the target the user asked
            # for, and would wreck the model on the way: refuse, and say how far we can go.
            raise CompressError(
                f"target_macs={target:g} is not reachable: with every layer it can rewrite "
                f"at its smallest rank, this pass keeps {best:.3f} of the model's MACs "
                f"({len(choices)} layers rewritable{_kept_note(summary)})"
            )
        # The pass's own default budget: do what it can, at a ratio the layers allow.
        budget = cheapest + (sum(c.layer.macs for c in choices) - cheapest) / 2
        summary["note"] = (
            f"default target {target:g} not reachable by this pass ({best:.3f} at best); "
            "halved the MACs it can remove instead — set target_macs to choose"
        )
    if choices:
        _knapsack(choices, budget)
    planned = fixed + sum(choice.macs for choice in choices)
    summary["planned_macs_ratio"] = planned / max(1, total_macs)


def _kept_note(summary: dict) -> str:
    kept = summary.get("kept_collapsing") or []
    return f"; kept because they collapse the outputs alone: {', '.join(kept)}" if kept else ""


def _knapsack(choices: list[LayerChoice], budget: float) -> None:
    # Per layer: keep it (its own MACs, no error) or one rung of its ladder (error²).
    groups = [
        [allocation.Option(choice.layer.macs, 0.0)]
        + [allocation.Option(c.macs, choice.scale * c.error**2) for c in choice.ladder]
        for choice in choices
    ]
    for choice, index in zip(choices, allocation.choose(groups, budget, BUDGET_STEPS), strict=True):
        choice.index = index - 1  # option 0 is "keep" (index -1)
