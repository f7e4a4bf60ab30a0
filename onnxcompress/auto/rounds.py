"""The rounds of the auto search: what each built plan gave (`Built`), the list of them beside
the report's entries (`Rounds`), and the `Search` that builds, checks and times them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import onnx

from onnxcompress.auto import plan as auto_plan
from onnxcompress.auto.checks import Checker
from onnxcompress.auto.choice import LATENCY_SLACK
from onnxcompress.auto.plan import LayerTable
from onnxcompress.auto.settings import SearchSettings
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext

log = logging.getLogger(__name__)

# Plans built and measured at most, the budget tightened after a miss and loosened after a
# plan far under target (bisecting once both are known).
LATENCY_ROUNDS = 5
PLANS_LOOP = "plans built and measured"


class Built(NamedTuple):
    """What a round built: the plan, the model it gave, its refit summary, its check, and the
    layers restored to keep it within the tolerance."""

    plan: dict
    model: onnx.ModelProto
    refit: Any
    check: dict
    restored: list[str]


class Rounds(list):
    """The rounds the search built and measured, in order: each one's check (the report's
    round entry, this list's items) with what it built beside it in `built`."""

    def __init__(self) -> None:
        super().__init__()
        self.built: list[Built] = []

    def add(self, entry: dict, plan, model, refit, check: dict, restored) -> dict:
        self.append(entry)
        self.built.append(Built(plan, model, refit, check, restored))
        return entry

    def merge(self, other: Rounds) -> None:
        self.extend(other)
        self.built.extend(other.built)


@dataclass(frozen=True)
class Search:
    """What every round of one search needs: the original model, the layers' cost tables, the
    candidate methods, the run's context, the settings and the whole-model checker."""

    model: onnx.ModelProto
    tables: list[LayerTable]
    methods: dict[str, Any]
    context: PassContext
    settings: SearchSettings
    checker: Checker

    def original_built(self) -> Built:
        """The original as a built plan (every layer kept, no refit, nothing restored)."""
        plan = {t.choice.name: t.keep for t in self.tables}
        return Built(plan, self.model, None, {}, [])

    def build_and_check(self, plan, tables: list[LayerTable]) -> Built:
        """Build the plan on the model, refit to its outputs; while the whole-model check fails
        the tolerance, restore the most damaging rewritten layer and rebuild."""
        restored: list[str] = []
        while True:
            compressed, refit = auto_plan.apply_plan(
                self.model, plan, tables, self.methods, self.context, self.settings.refit
            )
            check = self.checker(compressed, self.settings.kind)
            why = self.checker.fails(check)
            layer = auto_plan.restore_worst(tables, plan) if why else None
            if layer is None:
                if why:
                    check["tolerance_failed"] = why
                return Built(plan, compressed, refit, check, restored)
            log.info("auto: %s; restored %s", why, layer)
            restored.append(layer)

    def int8_round(self, built: Built, budget, quantize, rounds: Rounds) -> dict:
        """Quantize a built plan's model, check it like any round and record it; the check."""
        try:
            quantized = quantize(built.model)
        except CompressError as exc:  # onnxruntime's quantizer refused this plan: it is out
            quantized, check = built.model, {"tolerance_failed": f"int8 failed: {exc}"}
        else:
            check = self.checker(quantized, "latency")
            why = self.checker.fails(check)  # no back-off inside an int8 model: out if it fails
            if why:
                check["tolerance_failed"] = why
        entry = {"budget": budget, "int8": True, **check}
        rounds.add(entry, built.plan, quantized, built.refit, check, built.restored)
        return check

    def latency_rounds(
        self, start, tables=None, quantize=None, known=(None, None), count=LATENCY_ROUNDS
    ) -> Rounds:
        """Build and check plans from `tables` (default: the search's); for a latency target,
        tighten the budget after a miss and loosen it after a plan far under target, bisecting
        once both are known. With `quantize`, each plan is measured quantized to int8. `start`
        is (budget, floor, scale); `known`, the budgets that met and missed the target before;
        `count`, the rounds at most."""
        tables = self.tables if tables is None else tables
        rounds = Rounds()
        with self.context.progress(PLANS_LOOP, count) as bar:
            self._bisect(tables, start, known, count, quantize, rounds, bar)
        return rounds

    def _bisect(self, tables, start, known, count, quantize, rounds: Rounds, bar) -> None:
        """`latency_rounds`' plans, each counted on `bar` as it starts."""
        kind, target = self.settings.kind, self.settings.target
        budget, floor, scale = start
        met, missed = known  # the largest budget that met the target, the smallest that missed
        for _ in range(count):
            bar.advance()
            plan = auto_plan.allocate(tables, kind, budget)
            built = self.build_and_check(plan, tables)
            if quantize is None:
                rounds.add({"budget": round(budget, 6), **built.check}, *built)
                check = built.check
            else:
                check = self.int8_round(built, round(budget, 6), quantize, rounds)
                rounds[-1]["costs"] = "int8"
            if kind != "latency" or check.get("latency_ratio") is None:
                break
            ratio = self.checker.confirmed(rounds[-1], rounds.built[-1].model, target)
            if ratio <= target + LATENCY_SLACK:
                met = max(met or budget, budget)
                if ratio >= target or (ratio >= target - LATENCY_SLACK and not missed):
                    break  # on target: within the slack either side
                # Under target: this plan gives up more than it must; try a looser budget.
                # Also just under it once a looser plan missed: the step between the two can be
                # large; see docs/decisions.md#step-under-the-target-after-a-miss
                step = budget + (target - ratio) * scale
                budget = (budget + missed) / 2 if missed else step
            else:
                missed = min(missed or budget, budget)
                if budget <= floor:
                    rounds[-1]["note"] = "latency target missed with every layer at its cheapest"
                    break
                # The layers must give up what the whole model missed (never below the cheapest).
                step = max(floor, budget - (ratio - target) * scale)
                budget = (budget + met) / 2 if met else step
