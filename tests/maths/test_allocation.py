"""Allocation under a budget: the DP against brute force, feasibility, the curve, back-off."""

import itertools

import numpy as np
import pytest

from onnxcompress.maths.allocation import Option, back_off, choose, pareto_curve


def random_groups(rng, integer=False):
    """2–4 groups; option 0 is "keep" (dearest, no damage), then cheaper, more damaging ones."""
    groups = []
    for _ in range(rng.integers(2, 5)):
        keep = float(rng.integers(20, 200)) if integer else float(rng.uniform(1, 10))
        count = int(rng.integers(0, 4))
        costs = rng.integers(0, keep, size=count) if integer else rng.uniform(0, keep, count)
        damages = rng.uniform(0, 1, count)
        groups.append(
            [Option(keep, 0.0)]
            + [Option(float(c), float(d)) for c, d in zip(costs, damages, strict=True)]
        )
    return groups


def totals(groups, choice):
    cost = sum(group[i].cost for group, i in zip(groups, choice, strict=True))
    damage = sum(group[i].damage for group, i in zip(groups, choice, strict=True))
    return cost, damage


def brute_force(groups, budget):
    """Least total damage of any choice within `budget` (inf when none fits)."""
    best = np.inf
    for choice in itertools.product(*(range(len(g)) for g in groups)):
        cost, damage = totals(groups, choice)
        if cost <= budget:
            best = min(best, damage)
    return best


def cheapest_total(groups):
    return sum(min(o.cost for o in g) for g in groups)


def full_total(groups):
    return sum(max(o.cost for o in g) for g in groups)


@pytest.mark.parametrize("steps", [7, 50, 4000])
def test_choice_is_within_budget_and_optimal_up_to_one_unit_per_group(steps):
    rng = np.random.default_rng(steps)
    exact = 0
    for _ in range(300):
        groups = random_groups(rng)
        budget = float(rng.uniform(cheapest_total(groups), full_total(groups) * 1.1))
        choice = choose(groups, budget, steps)
        cost, damage = totals(groups, choice)
        assert cost <= budget
        unit = min(budget, full_total(groups)) / steps
        slack_budget = min(budget, full_total(groups)) - len(groups) * unit
        assert damage <= brute_force(groups, slack_budget) + 1e-12
        assert damage >= brute_force(groups, budget) - 1e-12  # brute force is the floor
        exact += damage <= brute_force(groups, budget) + 1e-12
    if steps == 4000:
        assert exact >= 0.95 * 300  # a fine grid loses only rarely to the rounding


def test_choice_is_exactly_optimal_when_costs_are_whole_units():
    rng = np.random.default_rng(1)
    for _ in range(300):
        groups = random_groups(rng, integer=True)
        budget = int(rng.integers(cheapest_total(groups), full_total(groups) + 1))
        # One unit is one cost unit: no rounding at all.
        choice = choose(groups, float(budget), steps=budget)
        cost, damage = totals(groups, choice)
        assert cost <= budget
        assert damage == pytest.approx(brute_force(groups, budget), abs=1e-12)


def test_budget_at_the_cheapest_total_returns_a_plan_within_it():
    # Costs that are not whole units: rounded up they no longer fit; the cheapest plan does.
    groups = [[Option(1.0, 0.0), Option(0.3, 1.0)], [Option(1.0, 0.0), Option(0.35, 2.0)]]
    budget = 0.65
    choice = choose(groups, budget, steps=4)
    assert choice == [1, 1]
    assert totals(groups, choice)[0] <= budget


def test_unreachable_budget_raises_with_the_cheapest_total():
    groups = [[Option(5.0, 0.0), Option(2.0, 1.0)], [Option(3.0, 0.0), Option(1.5, 0.5)]]
    with pytest.raises(ValueError, match="totals 3.5"):
        choose(groups, 3.4)
    assert choose(groups, 3.5) == [1, 1]


def test_large_budget_keeps_everything_and_zero_budget_takes_free_options():
    groups = [[Option(5.0, 0.0), Option(0.0, 1.0)], [Option(3.0, 0.0), Option(0.0, 0.5)]]
    assert choose(groups, 1e12) == [0, 0]
    assert choose(groups, float("inf")) == [0, 0]
    assert choose(groups, 0.0) == [1, 1]
    assert choose([], 0.0) == []


def test_ties_go_to_the_earlier_option():
    groups = [[Option(1.0, 0.0), Option(0.5, 0.0)]]
    assert choose(groups, 1.0) == [0]
    assert choose(groups, 0.5) == [1]


@pytest.mark.parametrize(
    "groups",
    [[[]], [[Option(-1.0, 0.0)]], [[Option(float("nan"), 0.0)]], [[Option(1.0, float("nan"))]]],
)
def test_bad_options_are_refused(groups):
    with pytest.raises(ValueError):
        choose(groups, 10.0)


def test_curve_is_pareto_and_spans_cheapest_to_full():
    rng = np.random.default_rng(7)
    for _ in range(50):
        groups = random_groups(rng)
        curve = pareto_curve(groups, points=15)
        costs = [p.cost for p in curve]
        damages = [p.damage for p in curve]
        assert costs == sorted(costs)
        assert all(
            b < a for a, b in zip(damages, damages[1:], strict=False)
        )  # more cost buys less damage
        for point in curve:
            assert totals(groups, point.choice) == pytest.approx((point.cost, point.damage))
        assert curve[0].cost == pytest.approx(cheapest_total(groups))
        # The last point is the best plan at the full cost: no damage here (keep all).
        assert curve[-1].damage == pytest.approx(brute_force(groups, full_total(groups)))
        # Every point is no worse than the optimum of its budget less the rounding slack.
        unit = full_total(groups) / 4000
        for point in curve:
            assert point.damage <= brute_force(groups, point.cost) + 1e-12
            assert point.damage >= brute_force(groups, point.cost + len(groups) * unit) - 1e-12


def test_back_off_restores_the_most_damaging_replaced_group():
    groups = [
        [Option(4.0, 0.0), Option(2.0, 0.3)],
        [Option(4.0, 0.0), Option(1.0, 0.9)],
        [Option(4.0, 0.0), Option(2.0, 0.5)],
    ]
    choice = [1, 1, 1]
    steps = []
    while choice is not None:
        steps.append(choice)
        choice = back_off(choice, groups)
    assert steps == [[1, 1, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0]]
    # An explicit ranking wins over the options' own damage; kept groups are passed over.
    assert back_off([1, 0, 1], groups, order=[1, 0, 2]) == [0, 0, 1]
    # A keep option that is not first in its group.
    assert back_off([0, 1, 1], groups, keep=[1, 0, 0]) == [0, 0, 1]
    with pytest.raises(ValueError):
        back_off([1, 1], groups)
