"""Choose one option per layer under a global budget with the least total damage: a
multiple-choice knapsack solved by dynamic programming over the budget; the trade-off curve
of the options it saw; and backing off one layer at a time when the whole model fails."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Option:
    """One way to treat one layer: what it costs (latency ms, MACs, bytes: any non-negative
    additive figure) and the damage it does (any additive figure, e.g. squared relative error
    of the model output with only this layer replaced). A layer's "keep" option is an Option
    like the others (its own cost, usually damage 0). `label` is the caller's, untouched."""

    cost: float
    damage: float
    label: Any = None


@dataclass(frozen=True)
class CurvePoint:
    """One plan of the trade-off curve: its total cost and damage, and the option per group."""

    cost: float
    damage: float
    choice: tuple[int, ...]


def choose(groups: Sequence[Sequence[Option]], budget: float, steps: int = 4000) -> list[int]:
    """Index of the chosen option in each group: least Σ damage such that Σ cost ≤ budget.

    A budget of at least the full cost (Σ of each group's dearest option) takes the least
    damaging option of every group. Otherwise: dynamic programming over the budget B cut into
    `steps` units of u = B / steps. Each cost is rounded *up* to whole units, so the result
    never costs more than `budget`. Guarantee, with n = len(groups): Σ damage of the result
    ≤ Σ damage of every choice whose Σ cost ≤ B − n·u (rounding adds less than one unit per
    group); exactly optimal when all costs are whole multiples of u. When the cheapest choice
    fits the budget but not in rounded-up units (B within n·u of the cheapest total), the
    cheapest choice is returned. Ties go to the earlier option of a group.
    O(n · options · steps) time, O(n · steps) memory.

    Raises ValueError when even the cheapest option of every group exceeds `budget` (the
    message gives that cheapest total), or for negative/NaN costs, NaN damage or empty groups.
    """
    _check(groups, steps)
    cheapest = _cheapest_total(groups)
    if cheapest > budget:
        raise ValueError(
            f"budget {budget:g} is not reachable: the cheapest option of every group "
            f"totals {cheapest:g}"
        )
    if budget >= _full_total(groups):  # every choice fits: no DP, no rounding
        return _least_damage_choice(groups)
    table = _Table(groups, budget, steps)
    choice = table.backtrack(table.steps)
    if choice is None:  # fits in real terms, not in rounded-up units
        choice = _cheapest_choice(groups)
    return choice


def pareto_curve(
    groups: Sequence[Sequence[Option]], points: int = 20, steps: int = 4000
) -> list[CurvePoint]:
    """The cost/damage trade-off of the options: plans chosen at `points` budgets evenly
    spaced from the cheapest to the full cost, Pareto-filtered (sorted by cost, each with
    strictly less damage than every cheaper one). One DP at the full budget serves every
    point: its table holds the best plan for each budget in units."""
    _check(groups, steps)
    if points < 1:
        raise ValueError(f"points={points}: expected at least 1")
    table = _Table(groups, _full_total(groups), steps)
    cheapest = _cheapest_choice(groups)
    low = table.width_total(cheapest)
    columns = np.unique(np.linspace(low, table.steps, points).round().astype(int))
    plans = {tuple(cheapest), tuple(_least_damage_choice(groups))}
    plans |= {tuple(c) for c in map(table.backtrack, columns) if c is not None}
    curve: list[CurvePoint] = []
    for plan in sorted(plans, key=lambda p: (*_totals(groups, p), p)):
        cost, damage = _totals(groups, plan)
        if not curve or damage < curve[-1].damage:
            curve.append(CurvePoint(cost, damage, plan))
    return curve


def back_off(
    choice: Sequence[int],
    groups: Sequence[Sequence[Option]],
    order: Sequence[int] | None = None,
    keep: int | Sequence[int] = 0,
) -> list[int] | None:
    """`choice` with one replaced group restored to its keep option: the first group of
    `order` (group indices, most damaging first) not already kept; without `order`, the group
    whose chosen option has the most damage. `keep` is the keep option's index, one for all
    groups or one per group. None when every group is already kept (nothing left to undo)."""
    keeps = [keep] * len(groups) if isinstance(keep, int) else list(keep)
    if len(choice) != len(groups) or len(keeps) != len(groups):
        raise ValueError("choice, groups and keep must have one entry per group")
    if order is None:
        order = sorted(range(len(groups)), key=lambda g: -groups[g][choice[g]].damage)
    for group in order:
        if choice[group] != keeps[group]:
            restored = list(choice)
            restored[group] = keeps[group]
            return restored
    return None


class _Table:
    """The DP over budget units: after group g, best[b] is the least damage of groups 0..g
    within b units; picks[g][b] is the option group g takes in that best plan."""

    def __init__(self, groups: Sequence[Sequence[Option]], budget: float, steps: int):
        budget = min(budget, _full_total(groups))
        self.steps = steps if budget > 0 else 0
        self.unit = _unit(budget, steps) if budget > 0 else 0.0
        self.widths = [[self._width(o.cost) for o in group] for group in groups]
        self.picks: list[np.ndarray] = []
        best = np.zeros(self.steps + 1)
        for group, widths in zip(groups, self.widths, strict=True):
            table = np.full((len(group), self.steps + 1), np.inf)
            for row, (option, width) in enumerate(zip(group, widths, strict=True)):
                if width <= self.steps:
                    table[row, width:] = best[: self.steps + 1 - width] + option.damage
            self.picks.append(table.argmin(axis=0))
            best = table.min(axis=0)
        self.best = best

    def _width(self, cost: float) -> int:
        """Whole units covering `cost`: the least w with w·u ≥ cost (exact, not 1e-9 off)."""
        if cost <= 0:
            return 0
        if self.unit == 0:
            return self.steps + 1  # a zero budget: anything that costs does not fit
        width = math.ceil(cost / self.unit)
        while width * self.unit < cost:
            width += 1
        while width > 0 and (width - 1) * self.unit >= cost:
            width -= 1
        return width

    def backtrack(self, column: int) -> list[int] | None:
        """The best plan within `column` units (None if none fits)."""
        if not np.isfinite(self.best[column]):
            return None
        choice = []
        for picks, widths in zip(reversed(self.picks), reversed(self.widths), strict=True):
            index = int(picks[column])
            choice.append(index)
            column -= widths[index]
        return choice[::-1]

    def width_total(self, choice: Sequence[int]) -> int:
        return min(self.steps, sum(w[i] for w, i in zip(self.widths, choice, strict=True)))


def _unit(budget: float, steps: int) -> float:
    """budget / steps, nudged down if needed so that steps whole units never exceed budget."""
    unit = budget / steps
    while unit * steps > budget:
        unit = math.nextafter(unit, 0.0)
    return unit


def _check(groups: Sequence[Sequence[Option]], steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps={steps}: expected at least 1")
    for index, group in enumerate(groups):
        if not group:
            raise ValueError(f"group {index} has no option (give it at least its keep option)")
        for option in group:
            if not option.cost >= 0 or math.isinf(option.cost):
                raise ValueError(f"group {index}: cost {option.cost} is not a finite cost ≥ 0")
            if math.isnan(option.damage):
                raise ValueError(f"group {index}: damage is NaN")


def _cheapest_choice(groups: Sequence[Sequence[Option]]) -> list[int]:
    """Per group the cheapest option, the least damaging among equally cheap ones."""
    return [
        min(range(len(group)), key=lambda i, g=group: (g[i].cost, g[i].damage, i))
        for group in groups
    ]


def _least_damage_choice(groups: Sequence[Sequence[Option]]) -> list[int]:
    return [min(range(len(group)), key=lambda i, g=group: (g[i].damage, i)) for group in groups]


def _full_total(groups: Sequence[Sequence[Option]]) -> float:
    """Σ of each group's dearest option: no choice costs more."""
    return sum(max(option.cost for option in group) for group in groups)


def _cheapest_total(groups: Sequence[Sequence[Option]]) -> float:
    return sum(min(option.cost for option in group) for group in groups)


def _totals(groups: Sequence[Sequence[Option]], choice: Sequence[int]) -> tuple[float, float]:
    cost = sum(group[i].cost for group, i in zip(groups, choice, strict=True))
    damage = sum(group[i].damage for group, i in zip(groups, choice, strict=True))
    return cost, damage
