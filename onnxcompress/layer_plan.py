"""A factorization pass's plan: each layer's ladder of candidates, the layers kept (skipped,
or collapsing the outputs alone), the rung chosen under the MAC budget, and the budget solved
again among the layers that stay fast once the never-slower check has put some back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from onnxcompress.errors import CompressError
from onnxcompress.mac_budget import LayerChoice, allocate
from onnxcompress.passkit import NodeRecord

if TYPE_CHECKING:  # types only: the driver imports this module
    from onnxcompress.analyse import ModelAnalysis
    from onnxcompress.factorization import Candidate, DriverOptions, Method

# A layer that, rewritten alone at its share of the budget, moves the model's outputs by this
# relative L2 is collapsing them (it is at least half the output's size): it is kept.
COLLAPSE_REL_L2 = 0.5


@dataclass
class Plan:
    records: list[NodeRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    choices: list[LayerChoice] = field(default_factory=list)  # the layers the budget may cut
    probes: dict[str, Any] = field(default_factory=dict)  # output_sensitivity.Probe by layer

    def chosen(self) -> list[tuple[Any, Candidate]]:
        """(layer, candidate) of every layer the plan rewrites."""
        return [(c.layer, c.current) for c in self.choices if c.current is not None]

    def settle(self, reverted: set[str]) -> None:
        """Record the layers the budget left original (not those `reverted` as slower)."""
        for choice in self.choices:
            if choice.current is None and choice.layer.name not in reverted:
                self.records.append(
                    skip_record(choice.layer, "kept: the budget was met without it")
                )


def plan_layers(
    layers, method: Method, options: DriverOptions, analysis: ModelAnalysis, probe
) -> Plan:
    plan = Plan(summary={"macs_before": analysis.total_macs})
    choices = []
    for layer in layers:
        reason = method.skip_reason(layer)
        ladder = [] if reason else pareto_ladder(method.candidates(layer), layer.macs)
        if not reason and not ladder:
            reason = "no rank saves MACs"
        if not reason and options.energy is not None:
            ladder = _within_energy(ladder, options.energy)
            reason = "" if ladder else f"every rank that saves MACs keeps < {options.energy} energy"
        if reason:
            plan.records.append(skip_record(layer, reason))
            continue
        choices.append(LayerChoice(layer, ladder))
    if options.target_macs is None:
        for choice in choices:  # explicit rank or energy: the cheapest allowed candidate
            choice.index = len(choice.ladder) - 1
    else:
        choices = _measured(choices, probe(choices), options, plan)
        allocate(choices, options, analysis.total_macs, plan.summary)
    plan.choices = choices
    return plan


# Times the budget is solved again after the never-slower check put layers back: each round
# times only the layers whose rung changed, so it stops when a round reverts nothing.
RESOLVE_ROUNDS = 3


def solve_again(plan: Plan, slow: set[str], options: DriverOptions) -> bool:
    """Solve the MAC budget again among the layers not `slow` (those stay original); False,
    plan unchanged, when the target is out of their reach."""
    choices = [c for c in plan.choices if c.layer.name not in slow]
    trial = dict(plan.summary)
    before = [c.index for c in choices]
    try:
        allocate(choices, options, plan.summary["macs_before"], trial)
    except CompressError:
        for choice, index in zip(choices, before, strict=True):
            choice.index = index
        return False
    for choice in plan.choices:
        if choice.layer.name in slow:
            choice.index = -1
    plan.summary.update(trial)
    plan.summary["budget_solves"] = plan.summary.get("budget_solves", 1) + 1
    return True


def _measured(choices: list[LayerChoice], probes: dict, options: DriverOptions, plan: Plan):
    """The choices left once layers that collapse the outputs are kept; with
    allocation=output, each weighed by its measured output damage."""
    kept, plan.probes = [], probes
    for choice in choices:
        probe = probes.get(choice.layer.name)
        if options.keep_collapsing and probe and probe.output_rel_l2 >= COLLAPSE_REL_L2:
            reason = (
                f"kept: rewritten alone at {options.target_macs:g} of its MACs it moves the "
                f"model's outputs by relative L2 {probe.output_rel_l2:.2f} (≥ {COLLAPSE_REL_L2})"
            )
            plan.records.append(skip_record(choice.layer, reason))
            plan.summary.setdefault("kept_collapsing", []).append(choice.layer.name)
            continue
        if probe is not None and options.allocation == "output":
            choice.scale = probe.scale
        kept.append(choice)
    if probes:
        plan.summary["probed_layers"] = len(probes)
        plan.summary["allocation"] = (
            "by measured output damage" if options.allocation == "output" else "by layer error"
        )
    return kept


def skip_record(layer, reason: str) -> NodeRecord:
    """A layer left as it is, and why."""
    return NodeRecord(layer.name, layer.node.op_type, "skipped", reason, macs_before=layer.macs)


def pareto_ladder(candidates: list[Candidate], layer_macs: int) -> list[Candidate]:
    """Candidates that save MACs and are not beaten on both MACs and error, most MACs first."""
    ladder: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.macs, c.error)):
        if candidate.macs < layer_macs and (not ladder or candidate.error < ladder[-1].error):
            ladder.append(candidate)
    return ladder[::-1]


def _within_energy(ladder: list[Candidate], energy: float) -> list[Candidate]:
    """Keep candidates whose weight keeps at least `energy` of ‖W‖² (error² ≤ 1 − energy)."""
    if not 0 < energy <= 1:
        raise CompressError(f"energy={energy}: expected a fraction in (0, 1]")
    return [c for c in ladder if c.error**2 <= 1 - energy + 1e-12]


# A layer kept with more relative error than this has lost over 3/4 of its (weight or data)
# energy: such plans are far past the point where accuracy holds; the summary says so.
CLIFF_ERROR = 0.5


def warn_past_the_cliff(errors: list[float], count: int, summary: dict) -> None:
    """Add to the summary's note when rewritten layers (their `errors`, of `count` the budget
    weighed) keep errors past CLIFF_ERROR; called on the plan as written, after any re-solve."""
    over = [error for error in errors if error > CLIFF_ERROR]
    if over:
        warning = (
            f"{len(over)} of {count} layers keep a relative error above {CLIFF_ERROR} "
            f"(worst {max(over):.2f}) to meet the budget: expect a large accuracy drop — check "
            "the validation, or ask for fewer MACs removed"
        )
        summary["note"] = f"{summary['note']}; {warning}" if summary.get("note") else warning
