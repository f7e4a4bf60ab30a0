"""The shared factorization driver on its own: a fake Method hands it synthetic candidate
tables for the three Convs of a tiny model, and the tests check the ladder, the budget
allocation (against brute force), energy and explicit selection, and the records."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.analyse import analyse
from onnxcompress.errors import CompressError
from onnxcompress.factorization import (
    Candidate,
    DriverOptions,
    Rewrite,
    run_factorization,
)
from onnxcompress.mac_budget import BUDGET_STEPS
from onnxcompress.passkit import NodeRecord, PassContext

# Three chained Convs with different costs: 4→4, 4→8, 8→4 channels, 3×3 on 8×8.
CHANNELS = [4, 4, 8, 4]
LAYERS = ["conv0", "conv1", "conv2"]


def chain_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i, (cin, cout) in enumerate(itertools.pairwise(CHANNELS)):
        weight = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        x = "x" if i == 0 else f"h{i - 1}"
        out = "y" if i == len(CHANNELS) - 2 else f"h{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [out], name=LAYERS[i], pads=[1] * 4))
    body = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS[0], 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS[-1], 8, 8])],
        inits,
    )
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])


MODEL = chain_model()
ANALYSIS = analyse(MODEL)
LAYER_MACS = {s.name: s.macs for s in ANALYSIS.nodes}
TOTAL = ANALYSIS.total_macs  # the Convs are all the model computes


class FakeMethod:
    """Candidates from a table: layer name -> [(fraction of the layer's MACs, error²), ...].

    `build` writes an identical Conv, so the graph stays valid; only the plan is under test.
    """

    def __init__(self, tables, skip=None):
        self.tables = tables
        self.skip = skip or {}

    def layers(self, model, analysis):
        # What the driver reads of a layer: name, node, macs, and weight/bias for the record.
        weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        layers = [
            SimpleNamespace(
                name=node.name,
                node=node,
                macs=LAYER_MACS[node.name],
                weight=weights[node.input[1]],
                bias=None,
            )
            for node in model.graph.node
            if node.name in self.tables
        ]
        others = [
            NodeRecord(n.name, n.op_type, "skipped", "not in the table")
            for n in model.graph.node
            if n.name not in self.tables
        ]
        return layers, others

    def skip_reason(self, layer):
        return self.skip.get(layer.name, "")

    def candidates(self, layer):
        return [
            Candidate({"index": i}, round(fraction * layer.macs), 0, math.sqrt(error_sq))
            for i, (fraction, error_sq) in enumerate(self.tables[layer.name])
        ]

    def build(self, layer, candidate, namer):
        node = onnx.NodeProto()
        node.CopyFrom(layer.node)
        node.name = namer(f"{layer.name}.fake")
        return Rewrite([node], [])


def plan(tables, skip=None, **options):
    """Run the driver; returns ({layer: chosen candidate index or None}, records, summary)."""
    driver = DriverOptions(never_slower=False, refit=False, **options)
    context = PassContext(ANALYSIS.input_shapes)
    result = run_factorization(MODEL, FakeMethod(tables, skip), driver, context, "fake")
    records = {r.node: r for r in result.records}
    chosen = {
        name: records[name].details["index"] if records[name].status == "rewritten" else None
        for name in tables
    }
    return chosen, records, result.summary


def cost(tables, chosen) -> tuple[int, float]:
    """(model MACs, Σ error²) of a choice of candidates, as the driver counts them."""
    macs, error = TOTAL, 0.0
    for name, index in chosen.items():
        if index is not None:
            fraction, error_sq = tables[name][index]
            macs -= LAYER_MACS[name] - round(fraction * LAYER_MACS[name])
            error += error_sq
    return macs, error


def brute_force(tables, max_macs) -> float:
    """The least Σ error² over every combination (keep or any candidate, per layer)."""
    options = [[None, *range(len(tables[name]))] for name in LAYERS]
    best = math.inf
    for combo in itertools.product(*options):
        macs, error = cost(tables, dict(zip(LAYERS, combo, strict=True)))
        if macs <= max_macs:
            best = min(best, error)
    return best


def convex_table(rng, rungs=4) -> list[tuple[float, float]]:
    """`rungs` candidates whose error² grows ever faster per MAC saved (a convex ladder)."""
    saved = np.sort(rng.choice(np.arange(5, 95), rungs, replace=False)) / 100
    slopes = np.sort(rng.uniform(0.1, 3.0, rungs))
    error_sq = np.cumsum(np.diff(saved, prepend=0.0) * slopes)
    table = [(1 - s, float(e)) for s, e in zip(saved, error_sq, strict=True)]
    return [table[i] for i in rng.permutation(rungs)]  # the driver must not rely on order


# ---------------------------------------------------------------- the ladder


def test_pareto_ladder_drops_dominated_and_useless_candidates():
    from onnxcompress.factorization import pareto_ladder

    def c(macs, error):
        return Candidate({"macs": macs, "error": error}, macs, 0, error)

    candidates = [
        c(60, 0.2),
        c(80, 0.3),  # dominated: dearer and worse than (60, 0.2)
        c(40, 0.4),
        c(40, 0.5),  # same MACs, worse error
        c(50, 0.4),  # dearer than (40, 0.4) for no gain
        c(90, 0.1),
        c(100, 0.0),  # saves nothing: the layer costs 100
        c(20, 0.7),
    ]
    ladder = pareto_ladder(candidates, layer_macs=100)
    assert [(x.macs, x.error) for x in ladder] == [(90, 0.1), (60, 0.2), (40, 0.4), (20, 0.7)]
    assert pareto_ladder([c(100, 0.0), c(120, 0.0)], layer_macs=100) == []


# ---------------------------------------------------------------- allocation under a budget


def _knapsack_slack(target):
    # Each layer's MACs are rounded up to budget/BUDGET_STEPS units: any plan that fits
    # len(LAYERS) units under the budget is one the solver can see.
    return len(LAYERS) * target * TOTAL / BUDGET_STEPS


@pytest.mark.parametrize("seed", range(12))
def test_allocation_meets_the_target_with_least_error(seed):
    rng = np.random.default_rng(seed)
    tables = {name: convex_table(rng) for name in LAYERS}
    cheapest = {
        name: min(range(4), key=lambda i, t=table: t[i][0]) for name, table in tables.items()
    }
    reachable = cost(tables, cheapest)[0] / TOTAL
    target = float(rng.uniform(reachable + 0.01, 0.95))
    chosen, _, summary = plan(tables, target_macs=target)
    macs, error = cost(tables, chosen)
    assert summary["planned_macs_ratio"] == pytest.approx(macs / TOTAL)
    assert macs <= target * TOTAL
    assert error <= brute_force(tables, target * TOTAL - _knapsack_slack(target)) + 1e-12


def test_back_fill_undoes_an_overshooting_step():
    # conv0's only rung is the best value per MAC, so the descent takes it first; it then
    # still needs conv1's rung. conv1's rung alone meets the target, and back-fill restores
    # conv0: the plan ends at the brute-force optimum.
    tables = {"conv0": [(0.9, 0.01)], "conv1": [(0.5, 0.2)], "conv2": [(0.99, 1.0)]}
    target = (TOTAL - 0.5 * LAYER_MACS["conv1"]) / TOTAL
    chosen, _, _ = plan(tables, target_macs=target)
    assert chosen == {"conv0": None, "conv1": 0, "conv2": None}
    assert cost(tables, chosen)[1] == pytest.approx(0.2)
    assert brute_force(tables, target * TOTAL) == pytest.approx(0.2)


def test_descent_looks_past_a_poor_first_rung():
    # conv1's first rung saves little; its second (half its MACs for error² 0.06) beats
    # conv2's only rung (error² 0.3). Jumping to any cheaper rung finds it.
    tables = {
        "conv0": [(0.99, 5.0)],
        "conv1": [(0.95, 0.05), (0.5, 0.06)],
        "conv2": [(0.0, 0.3)],
    }
    target = (TOTAL - 0.5 * LAYER_MACS["conv1"]) / TOTAL
    assert LAYER_MACS["conv2"] >= 0.5 * LAYER_MACS["conv1"]
    chosen, _, _ = plan(tables, target_macs=target)
    assert chosen == {"conv0": None, "conv1": 1, "conv2": None}
    assert cost(tables, chosen)[1] == pytest.approx(0.06)
    assert brute_force(tables, target * TOTAL) == pytest.approx(0.06)


def test_allocation_is_optimal_up_to_unit_rounding_on_random_tables():
    rng = np.random.default_rng(123)
    excess = []
    for _ in range(200):
        tables = {name: convex_table(rng) for name in LAYERS}
        cheapest = {
            name: min(range(4), key=lambda i, t=table: t[i][0]) for name, table in tables.items()
        }
        reachable = cost(tables, cheapest)[0] / TOTAL
        target = float(rng.uniform(reachable + 0.01, 0.95))
        chosen, _, _ = plan(tables, target_macs=target)
        macs, error = cost(tables, chosen)
        assert macs <= target * TOTAL
        assert error <= brute_force(tables, target * TOTAL - _knapsack_slack(target)) + 1e-12
        best = brute_force(tables, target * TOTAL)
        excess.append(error / best - 1 if best > 0 else 0.0)
    excess = np.array(excess)
    print(
        f"optimal in {np.mean(excess < 1e-9):.0%}, median excess {np.median(excess):.3f}, "
        f"max {excess.max():.3f}"
    )
    assert np.mean(excess < 1e-9) >= 0.95  # the rest lose only to the unit rounding


def test_layers_left_alone_by_the_budget_get_a_record():
    tables = {name: [(0.5, 0.01 if name == "conv1" else 1.0)] for name in LAYERS}
    target = (TOTAL - 0.5 * LAYER_MACS["conv1"]) / TOTAL
    chosen, records, summary = plan(tables, target_macs=target)
    assert chosen == {"conv0": None, "conv1": 0, "conv2": None}
    assert records["conv0"].status == "skipped"
    assert records["conv0"].reason == "kept: the budget was met without it"
    assert "target_reached" not in summary


def test_unreachable_target_is_refused_with_how_far_the_pass_goes():
    tables = {name: [(0.9, 0.1), (0.8, 0.2)] for name in LAYERS}
    with pytest.raises(CompressError, match=r"target_macs=0.5 is not reachable.* keeps 0\.800"):
        plan(tables, target_macs=0.5)


def test_an_unreachable_default_target_halves_what_the_pass_can_remove():
    tables = {name: [(0.9, 0.01), (0.6, 0.04)] for name in LAYERS}
    chosen, _, summary = plan(tables, target_macs=0.5, default_target=True)
    assert "default target 0.5 not reachable by this pass (0.600 at best)" in summary["note"]
    # Half of the removable 40 % is removed: the plan keeps at most 80 % of the MACs.
    assert 0.6 <= summary["planned_macs_ratio"] <= 0.8 + 1e-9
    assert any(index is not None for index in chosen.values())


def test_a_plan_past_the_error_cliff_is_warned_about():
    tables = {name: [(0.9, 0.01), (0.5, 0.49)] for name in LAYERS}  # (MACs, error²)
    chosen, _, summary = plan(tables, target_macs=0.5)
    assert chosen == {name: 1 for name in LAYERS}
    assert "3 of 3 layers keep a relative error above 0.5 (worst 0.70)" in summary["note"]
    _, _, gentle = plan(tables, target_macs=0.95)
    assert "note" not in gentle


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_bad_target_or_energy_is_an_error(value):
    tables = {name: [(0.5, 0.1)] for name in LAYERS}
    with pytest.raises(CompressError, match="target_macs"):
        plan(tables, target_macs=value)
    with pytest.raises(CompressError, match="energy"):
        plan(tables, energy=value)


# ---------------------------------------------------------------- energy and explicit choice


def test_energy_picks_the_cheapest_candidate_within_the_energy():
    tables = {
        "conv0": [(0.9, 0.01), (0.6, 0.05), (0.3, 0.2)],
        "conv1": [(0.7, 0.1), (0.8, 0.02)],  # 0.1 is exactly 1 − energy: allowed
        "conv2": [(0.5, 0.3), (0.9, 0.25)],  # nothing keeps 90 %
    }
    chosen, records, summary = plan(tables, energy=0.9)
    assert chosen == {"conv0": 1, "conv1": 0, "conv2": None}
    assert records["conv2"].status == "skipped"
    assert records["conv2"].reason == "every rank that saves MACs keeps < 0.9 energy"
    assert "target_reached" not in summary
    # With a budget too, energy first filters the ladders, then the budget picks.
    chosen, _, _ = plan(tables, energy=0.9, target_macs=0.99)
    assert chosen["conv2"] is None


def test_explicit_choice_takes_the_cheapest_allowed_candidate():
    tables = {
        "conv0": [(0.7, 0.3), (0.4, 0.5), (0.6, 0.9)],  # (0.6, 0.9) is dominated
        "conv1": [(1.0, 0.0), (1.2, 0.0)],  # saves no MACs
        "conv2": [(0.5, 0.2)],
    }
    chosen, records, _ = plan(tables, skip={"conv2": "told to skip"})
    assert chosen == {"conv0": 1, "conv1": None, "conv2": None}
    assert records["conv0"].macs_after == round(0.4 * LAYER_MACS["conv0"])
    assert records["conv0"].macs_before == LAYER_MACS["conv0"]
    assert records["conv0"].details["weight_rel_error"] == pytest.approx(math.sqrt(0.5))
    assert records["conv1"].reason == "no rank saves MACs"
    assert records["conv2"].reason == "told to skip"


def test_nothing_chosen_returns_the_model_unchanged():
    tables = {"conv0": [(1.0, 0.0)]}
    driver = DriverOptions(never_slower=False, refit=False)
    context = PassContext(ANALYSIS.input_shapes)
    result = run_factorization(MODEL, FakeMethod(tables), driver, context, "fake")
    assert not result.changed
    assert result.model.SerializeToString() == MODEL.SerializeToString()
    assert [r.node for r in result.records] == ["conv1", "conv2", "conv0"]  # method's skips first


def test_reverted_layers_that_miss_the_target_are_said(monkeypatch):
    import onnxcompress.auto.layer_timing as layer_timing

    slow = {"original_ms": 1.0, "rewritten_ms": 1.07, "speedup": 1 / 1.07}
    monkeypatch.setattr(layer_timing, "compare_layer", lambda *args, **kwargs: dict(slow))
    tables = {name: [(0.5, 0.01)] for name in LAYERS}
    driver = DriverOptions(never_slower=True, refit=False, target_macs=0.9)
    context = PassContext(ANALYSIS.input_shapes)
    result = run_factorization(MODEL, FakeMethod(tables), driver, context, "fake")
    reverted = [r for r in result.records if r.status == "reverted"]
    assert reverted and all("1.07× slower" in r.reason for r in reverted)
    assert result.summary["target_reached"] is False
    # Each solve picks another layer and each is put back: all three, target missed.
    assert {r.node for r in reverted} == set(LAYERS)
    assert "3 layers were put back as not faster" in result.summary["note"]


def test_the_budget_is_solved_again_among_the_layers_that_stay_fast(monkeypatch):
    import onnxcompress.auto.layer_timing as layer_timing

    def timing(constants, layer, rewrite, threads):
        speedup = 0.9 if layer.name == "conv1" else 2.0  # conv1's rewrite is slower
        return {"original_ms": 1.0, "rewritten_ms": 1 / speedup, "speedup": speedup}

    monkeypatch.setattr(layer_timing, "compare_layer", timing)
    # conv1 is the cheapest to cut (least error per MAC): the first solve takes it alone.
    tables = {"conv0": [(0.5, 0.2)], "conv1": [(0.5, 0.01)], "conv2": [(0.5, 0.2)]}
    target = 1 - LAYER_MACS["conv1"] / 2 / TOTAL + 0.01  # the knapsack rounds costs up
    driver = DriverOptions(never_slower=True, refit=False, target_macs=target)
    result = run_factorization(
        MODEL, FakeMethod(tables), driver, PassContext(ANALYSIS.input_shapes), "fake"
    )
    status = {r.node: r.status for r in result.records}
    assert status["conv1"] == "reverted"
    assert "rewritten" in (status["conv0"], status["conv2"])
    # The fake's rewrites are copies of the layers: the plan's MACs are the ones to check.
    assert result.summary["planned_macs_ratio"] <= target
    assert result.summary["budget_solves"] == 2


def test_the_cliff_warning_speaks_of_the_plan_written_after_a_re_solve(monkeypatch):
    """conv1 (error 0.1) is put back as slower; solved again, the budget takes conv2 at error
    0.7: the warning must speak of conv2, which the first plan did not have."""
    import onnxcompress.auto.layer_timing as layer_timing

    def timing(constants, layer, rewrite, threads):
        speedup = 0.9 if layer.name == "conv1" else 2.0
        return {"original_ms": 1.0, "rewritten_ms": 1 / speedup, "speedup": speedup}

    monkeypatch.setattr(layer_timing, "compare_layer", timing)
    tables = {"conv0": [(0.5, 0.9)], "conv1": [(0.5, 0.01)], "conv2": [(0.5, 0.49)]}
    target = 1 - LAYER_MACS["conv1"] / 2 / TOTAL + 0.01
    driver = DriverOptions(never_slower=True, refit=False, target_macs=target)
    result = run_factorization(
        MODEL, FakeMethod(tables), driver, PassContext(ANALYSIS.input_shapes), "fake"
    )
    status = {r.node: r.status for r in result.records}
    assert status == {"conv0": "skipped", "conv1": "reverted", "conv2": "rewritten"}
    assert "1 of 3 layers keep a relative error above 0.5 (worst 0.70)" in result.summary["note"]


@pytest.mark.parametrize(
    "keep, kept",
    [
        ("conv1", {"conv1"}),
        ("first,last", {"conv0", "conv2"}),
        ("conv[02]", {"conv0", "conv2"}),
        ("classifier", {"conv2"}),  # the model's last layer with a weight
    ],
)
def test_keep_leaves_the_named_layers_as_they_are(keep, kept):
    tables = {name: [(0.5, 0.01)] for name in LAYERS}
    driver = DriverOptions(never_slower=False, refit=False, target_macs=0.9, keep=keep)
    result = run_factorization(
        MODEL, FakeMethod(tables), driver, PassContext(ANALYSIS.input_shapes), "fake"
    )
    reasons = {r.node: r.reason for r in result.records if r.reason.startswith("kept: ")}
    assert {name for name, why in reasons.items() if "(fake.keep)" in why} == kept
    assert not kept & {r.node for r in result.records if r.status == "rewritten"}


def test_an_empty_keep_is_refused():
    driver = DriverOptions(never_slower=False, refit=False, target_macs=0.9, keep=" , ")
    with pytest.raises(CompressError, match="fake.keep is empty"):
        run_factorization(
            MODEL,
            FakeMethod({"conv0": [(0.5, 0.01)]}),
            driver,
            PassContext(ANALYSIS.input_shapes),
            "fake",
        )


def test_the_classifier_is_cut_when_it_is_the_only_layer_the_pass_can_take():
    driver = DriverOptions(never_slower=False, refit=False, target_macs=0.9, keep="classifier")
    result = run_factorization(
        MODEL,
        FakeMethod({"conv2": [(0.5, 0.01)]}),
        driver,
        PassContext(ANALYSIS.input_shapes),
        "fake",
    )
    assert [r.node for r in result.records if r.status == "rewritten"] == ["conv2"]


def test_no_rung_is_kept_untimed_after_the_last_solve(monkeypatch):
    import onnxcompress.auto.layer_timing as layer_timing
    import onnxcompress.factorization as factorization

    def timing(constants, layer, rewrite, threads):
        speedup = 2.0 if layer.name == "conv0" else 0.9  # conv1 and conv2 are slower
        return {"original_ms": 1.0, "rewritten_ms": 1 / speedup, "speedup": speedup}

    monkeypatch.setattr(layer_timing, "compare_layer", timing)
    monkeypatch.setattr(factorization, "RESOLVE_ROUNDS", 1)
    # Cheapest to cut first: conv1, then conv2, then conv0; each solve takes the next.
    tables = {"conv0": [(0.5, 0.3)], "conv1": [(0.5, 0.01)], "conv2": [(0.5, 0.1)]}
    target = 1 - LAYER_MACS["conv0"] / 2 / TOTAL + 0.01  # any one layer's cut meets it
    driver = DriverOptions(never_slower=True, refit=False, target_macs=target)
    result = run_factorization(
        MODEL, FakeMethod(tables), driver, PassContext(ANALYSIS.input_shapes), "fake"
    )
    status = {r.node: r.status for r in result.records}
    assert status == {"conv0": "skipped", "conv1": "reverted", "conv2": "reverted"}
    assert result.summary["budget_solves"] == 2  # one solve again: its rung (conv2) was timed
    assert all("timing" in r.details for r in result.records if r.status != "skipped")
