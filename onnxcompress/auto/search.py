"""`auto`'s search: sensitivity runs (in parallel), cost tables, allocation, then build, refit
and check the whole model, tightening the budget or backing off until it holds."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any

import numpy as np
import onnx

from onnxcompress import benchmark, executor, graph, residual_blocks
from onnxcompress.auto import plan as auto_plan
from onnxcompress.auto import sensitivity as sensitivity
from onnxcompress.auto.plan import LayerTable, Scored
from onnxcompress.auto.rounds import Built, Rounds
from onnxcompress.calibration import random_inputs
from onnxcompress.errors import CompressError
from onnxcompress.factorization import CLIFF_ERROR
from onnxcompress.passkit import (
    NodeRecord,
    PassContext,
    PassResult,
    first_samples,
    sample_count,
    track,
)

log = logging.getLogger(__name__)

# A whole model within this much of its latency target is on target (timing noise).
LATENCY_SLACK = 0.02
# With every round off target, rounds this close to the fastest count as equally fast, so
# timing noise does not cost a plan with far less error; see docs/decisions.md#missed_tie
MISSED_TIE = 0.05
# Plans built and measured at most, the budget tightened after a miss and loosened after a
# plan far under target (bisecting once both are known).
LATENCY_ROUNDS = 5
CURVE_POINTS = 12
# The original's whole-model timing (the layer tables' scale) runs at least this long.
TIMING_SECONDS = 1.0
# A plan's ratio is the median of short windows timing it beside the original, as one window
# is noisy whatever its length; see docs/decisions.md#window_seconds-check_windows
WINDOW_SECONDS = 0.5
CHECK_WINDOWS = 3
# The choice is made on these windows alone, taken at the end for every round together, as a
# round's own windows lean low; see docs/decisions.md#retime_windows
RETIME_WINDOWS = 5
# A round this close to the target is timed in CONFIRM_WINDOWS more windows before the search
# decides on it.
CONFIRM_BAND = 0.04
CONFIRM_WINDOWS = 4
# A layer whose int8 kernel, timed alone, takes this many times its float one is tried in float
# inside the int8 model (timed alone, int8 also pays quantizing its input and dequantizing its
# output, which inside an int8 model it does not: a small excess is that, not the kernel).
INT8_SLOWER = 1.2


def search(
    model,
    analysis,
    choices,
    methods,
    options,
    context: PassContext,
    quantize=None,
    quantize_layer=None,
    factory: str = "",
) -> PassResult:
    """The whole search; the result's summary is the `auto` section of the report.
    `factory` ("module:function") makes the methods in sensitivity worker processes.
    `quantize(model) -> model` (int8), when given, is tried on the original and the best plan;
    with `quantize_layer(model, feeds) -> model` too, plans are also chosen on int8 timings."""
    kind, target = options.budget()
    sample = first_samples(context.calibration, options.sensitivity_samples)
    measured = run_sensitivity(model, choices, options, context, sample, factory)
    in_graph = kind == "latency" and options.latency_basis == "graph"
    with context.progress("timing candidates", sum(len(c.candidates) for c in choices)) as bar:
        tables = auto_plan.score_layers(
            model, choices, measured, context.threads, bar, time_alone=not in_graph
        )
    feeds = timing_feeds(model, context)
    if in_graph:
        count = sum(len(t.options) for t in tables)
        with context.progress("timing candidates in the model", count) as bar:
            auto_plan.time_in_graph(model, tables, measured, feeds, context.threads, bar)
    total = _model_total(kind, model, analysis, feeds, context.threads)
    budget, rest, scale = auto_plan.budget_for(kind, target, tables, total)
    floor = _floor(tables, kind)
    out_of_reach = ""
    if budget < floor:
        cheapest = (rest + floor) / scale
        why = (
            f"every layer at its cheapest candidate keeps {cheapest:.3f} of the model's {kind} "
            f"(the rest of the model, which auto does not rewrite, is {rest / scale:.3f} of it)"
        )
        if kind != "latency":
            raise CompressError(f"auto: target_{kind}={target:g} is not reachable: {why}")
        out_of_reach = f"target_{kind}={target:g} looks out of reach: {why}"
        # The estimate moves with one whole-model timing's noise: build the cheapest plan and
        # let the measurement decide; see docs/decisions.md#latency-target-out-of-reach
        budget = floor
    checker = _Checker(model, context, feeds, options)
    build = (model, tables, methods, context, options, checker)
    rounds = _latency_rounds(*build, (budget, floor, scale))
    if out_of_reach:
        rounds[0]["estimate"] = out_of_reach + "; built and measured instead"
    on_latency = target if kind == "latency" else None
    max_error = usable_error(options)
    # Per kind of cost: the tables, and the rest and total their ratios are taken with.
    cost_tables = {"float": (tables, rest, scale)}
    if quantize and on_latency and context.calibration:
        best = _best_round(rounds, on_latency, max_error)
        original_int8 = _int8_rounds(model, tables, rounds.built[best], rounds, quantize, checker)
        if quantize_layer and original_int8 and original_int8 > target + LATENCY_SLACK:
            cost_tables["int8"], more = _int8_table_rounds(
                build, measured, quantize, quantize_layer, original_int8, total
            )
            rounds.merge(more)
        elif quantize_layer and original_int8:
            _mixed_on_target(build, measured, quantize, quantize_layer, rounds)
    blocks = None
    if on_latency and options.wants_blocks(context):
        # Per-layer plans on the model with blocks removed never won (docs/decisions.md
        # #plan_after_blocks_rounds): the block rounds stand alone.
        blocks = _block_rounds(build, quantize, rounds, max_error)
    if on_latency:
        _retime(rounds, checker)
        if _search_again(rounds, build, (floor, scale), max_error):
            _retime(rounds, checker)
    chosen = _best_round(rounds, on_latency, max_error)
    tables, rest, scale = cost_tables[rounds[chosen].get("costs", "float")]
    plan, compressed, refit, _, backed_off = rounds.built[chosen]
    summary = _summary(kind, target, tables, plan, rounds, chosen, backed_off, refit, scale, rest)
    if kind == "latency":  # measured on the whole model, not predicted
        summary["target_reached"] = rounds[chosen]["latency_ratio"] <= target + LATENCY_SLACK
        summary["broken_over"] = max_error
        broken = _broken_faster(rounds, chosen, max_error)
        if broken:
            summary["broken_faster"] = broken
    summary["sensitivity"] = {
        "basis": "outputs" if sample else "weights (no calibration data)",
        "samples": sample_count(sample),
        "jobs": jobs_of(options, context),
    }
    quantized = bool(rounds[chosen].get("int8"))
    if quantize:
        summary["int8"] = {
            "quantized": quantized,
            "tried": bool(on_latency and context.calibration),
            "float_layers": rounds[chosen].get("float_layers", []),
            "note": "int8 (static QDQ) of the original and of the best float plan, and of "
            "the original with layers whose int8 kernel is slower left in float; if the int8 "
            "original misses the target, plans chosen on int8 timings; each measured like "
            "every round; needs a latency target and calibration data",
        }
    records = _records(tables, plan, backed_off)
    removed = rounds[chosen].get("blocks", [])
    if blocks is not None:
        summary["blocks"] = {**blocks, "removed": removed}
        _mark_removed(records, summary, model, removed)
    changed = quantized or _factorized(plan) or bool(removed)
    return PassResult(compressed if changed else model, changed, records, summary)


def _latency_rounds(
    model,
    tables,
    methods,
    context,
    options,
    checker,
    start,
    quantize=None,
    known=(None, None),
    count=LATENCY_ROUNDS,
):
    """Build and check plans; for a latency target, tighten the budget after a miss and
    loosen it after a plan far under target, bisecting once both are known. Returns the
    rounds (their checks, and what each built). With
    `quantize`, each plan is measured quantized to int8. `start` is (budget, floor, scale);
    `known`, the budgets that met and missed the target before; `count`, the rounds at most."""
    kind, target = options.budget()
    budget, floor, scale = start
    rounds = Rounds()
    met, missed = known  # the largest budget that met the target, the smallest that missed
    for _ in range(count):
        plan = auto_plan.allocate(tables, kind, budget)
        built = _build_and_check(model, plan, tables, methods, context, options, checker)
        if quantize is None:
            rounds.add({"budget": round(budget, 6), **built[2]}, plan, *built)
            check = built[2]
        else:
            compressed, refit, _, restored = built
            built = (plan, compressed, refit, restored)
            check = _int8_round(built, round(budget, 6), quantize, checker, rounds)
            rounds[-1]["costs"] = "int8"
        if kind != "latency" or check.get("latency_ratio") is None:
            break
        ratio = _confirmed(rounds[-1], rounds.built[-1].model, checker, target)
        if ratio <= target + LATENCY_SLACK:
            met = max(met or budget, budget)
            if ratio >= target or (ratio >= target - LATENCY_SLACK and not missed):
                break  # on target: within the slack either side
            # Under target: this plan gives up more than it must; try a looser budget. Also
            # just under it once a looser plan missed: the step between the two can be large;
            # see docs/decisions.md#step-under-the-target-after-a-miss
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
    return rounds


def _int8_rounds(model, tables, best_float: Built, rounds, quantize, checker) -> float | None:
    """Two more rounds: the original quantized to int8 (every layer kept) and the best float
    plan quantized. Whether int8 pays depends on the runtime and the shapes, so it is measured
    like every round and kept only if it wins (see docs/decisions.md#no-int8-around-float-factors).
    Returns the int8 original's latency ratio (None when the quantizer failed on it)."""
    plan, compressed, refit, _, restored = best_float
    sources = [("the original", _original_built(model, tables))]
    if _factorized(plan):
        sources.append(("the best float plan", (plan, compressed, refit, restored)))
    checks = []
    for of, built in sources:
        checks.append(_int8_round(built, None, quantize, checker, rounds))
        rounds[-1]["of"] = of
    return checks[0].get("latency_ratio")


def _original_built(model, tables) -> tuple:
    """The original as a built plan (every layer kept, no refit, nothing restored)."""
    return {t.choice.name: t.keep for t in tables}, model, None, []


def _int8_table_rounds(build, measured, quantize, quantize_layer, original_int8, total):
    """Plans chosen for int8: every candidate and layer timed quantized, the budget set from
    the int8 original's measured latency, then the same tighten/loosen rounds as the float
    search, each plan measured quantized. Returns the int8 cost tables with the rest and
    total of the float original their ratios are taken with, and the rounds."""
    model, tables, methods, context, options, checker = build
    target = options.budget()[1]
    count = sum(len(t.options) for t in tables)
    with context.progress("timing candidates in int8", count) as bar:
        tables8 = auto_plan.int8_tables(
            model, tables, measured, context.threads, quantize_layer, bar
        )
    rounds = Rounds()
    in_float = _int8_slower(tables, tables8)
    if in_float:
        mixed = _mixed_original(model, tables, in_float, quantize, checker, rounds)
        if mixed is None or mixed >= original_int8:
            in_float = []
        else:  # the plans below start from this model: those layers cost their float time
            original_int8 = mixed
            quantize = _keeping_in_float(quantize, in_float)
            for table, table8 in zip(tables, tables8, strict=True):
                if table.choice.name in in_float:
                    table8.keep = dataclasses.replace(table.keep)
    # Ratios are of the float original; the int8 tables' costs add up to the int8 model's.
    budget, rest, scale = auto_plan.budget_for(
        "latency", target / original_int8, tables8, original_int8 * total
    )
    if original_int8 <= target + LATENCY_SLACK:
        return (tables8, rest, scale / original_int8), rounds
    floor = _floor(tables8, "latency")
    start = (max(budget, floor), floor, scale / original_int8)
    more = _latency_rounds(model, tables8, methods, context, options, checker, start, quantize)
    for round_, built in zip(more, more.built, strict=True):
        kept = [name for name in in_float if built.plan[name].method == "keep"]
        if kept:
            round_["float_layers"] = kept
    rounds.merge(more)
    return (tables8, rest, scale / original_int8), rounds


def _mixed_on_target(build, measured, quantize, quantize_layer, rounds) -> None:
    """With the int8 original on target, one more round: it with the layers whose int8
    kernel is slower left in float, which quantizes less (less error) and may run faster (see
    docs/decisions.md#mixed-original-when-int8-is-on-target). Only the layers' own int8
    timings are needed, not every candidate's."""
    model, tables, _, context, _, checker = build
    with context.progress("timing layers in int8", len(tables)) as bar:
        keeps8 = auto_plan.int8_tables(
            model, tables, measured, context.threads, quantize_layer, bar, keep_only=True
        )
    in_float = _int8_slower(tables, keeps8)
    if in_float:
        _mixed_original(model, tables, in_float, quantize, checker, rounds)


def _int8_slower(tables: list[LayerTable], tables8: list[LayerTable]) -> list[str]:
    """The layers whose int8 kernel, timed alone, is over INT8_SLOWER times their float one
    (see docs/decisions.md#int8_slower)."""
    return [
        table.choice.name
        for table, table8 in zip(tables, tables8, strict=True)
        if table8.keep.latency_ms > INT8_SLOWER * table.keep.latency_ms
    ]


def _keeping_in_float(quantize, layers: list[str]):
    """`quantize` leaving the named layers (those a plan still has) in float."""

    def mixed(source: onnx.ModelProto) -> onnx.ModelProto:
        return quantize(source, graph.float_region(source, layers))

    return mixed


def _mixed_original(model, tables, layers, quantize, checker, rounds) -> float | None:
    """One more round: the original in int8 but for `layers` (and the ops up to the next
    layers) in float. Its latency ratio, None if it failed."""
    built = _original_built(model, tables)
    check = _int8_round(built, None, _keeping_in_float(quantize, layers), checker, rounds)
    rounds[-1].update({"of": "the original", "float_layers": layers})
    return None if check.get("tolerance_failed") else check.get("latency_ratio")


def _failed_whole(round_: dict) -> bool:
    """An int8 or block round that failed the user's tolerance: it is out (a float plan that
    fails it was backed off to the one recorded, which stays)."""
    return bool(round_.get("int8") or round_.get("blocks")) and "tolerance_failed" in round_


def _block_rounds(build, quantize, rounds, max_error) -> dict | None:
    """Rounds of the original with whole identity residual blocks removed, the least damaging
    first (each block's damage measured alone, the layers after it refit on the sensitivity
    samples), one more block a round, the layers after them refit on the calibration data;
    each measured in float and, with `quantize`, in int8, like every round. Per-layer plans
    keep every op, whose per-op cost at batch 1 can be most of the time (see
    docs/decisions.md#autooptionsblocks). Stops at the first count with a round on target, or
    when the outputs break. What was measured (None
    for a model without such blocks)."""
    model, tables, _, context, options, checker = build
    found = residual_blocks.identity_blocks(model)
    if not found:
        return None
    target = options.budget()[1]
    sample = first_samples(context.calibration, options.sensitivity_samples)
    damage = residual_blocks.damage_alone(model, found, context, sample)
    ranked = sorted(found, key=lambda block: damage[block.add])
    keep_all = _original_built(model, tables)[0]
    for count in track(context.progress, "block removal rounds", range(1, len(ranked) + 1)):
        names = [block.add for block in ranked[:count]]
        dropped = residual_blocks.without_blocks(model, ranked[:count])
        dropped, refit = residual_blocks.refit_after(model, dropped, context)
        check = checker(dropped, "latency")
        why = checker.fails(check)
        if why:
            check["tolerance_failed"] = why
        rounds.add({"budget": None, "blocks": names, **check}, keep_all, dropped, refit, check, [])
        checks = [check]
        if quantize:
            built = (keep_all, dropped, refit, [])
            checks.append(_int8_round(built, None, quantize, checker, rounds))
            rounds[-1].update({"of": f"{count} block(s) removed", "blocks": names})
        on_target = any(
            c.get("latency_ratio", 1.0) <= target + LATENCY_SLACK and "tolerance_failed" not in c
            for c in checks
        )
        if on_target or _breaks(check, max_error):
            break
    return {"damage_alone": damage, "ranked": [block.add for block in ranked]}


def _mark_removed(records: list[NodeRecord], summary: dict, model, removed: list[str]) -> None:
    """The layers that went with removed blocks: records and the summary's layer table say
    so (the plan kept them: it was not a per-layer choice)."""
    if not removed:
        return
    blocks = [b for b in residual_blocks.identity_blocks(model) if b.add in removed]
    gone = {node.name for node in residual_blocks.removed_nodes(model, blocks)}
    for record in records:
        if record.node in gone:
            record.status, record.reason = "rewritten", "removed with its residual block"
            record.params_after = record.macs_after = 0
            record.details = {"method": "removed"}
    for layer in summary["layers"]:
        if layer["node"] in gone:
            layer.update(method="removed", config={}, macs_after=0, params_after=0)
            layer.update(latency_ms_after=0.0, damage=None)


def _int8_round(built, budget, quantize, checker, rounds: Rounds) -> dict:
    """Quantize a built plan's model, check it like any round and record it; the check."""
    plan, source, refit, restored = built
    try:
        quantized = quantize(source)
    except CompressError as exc:  # onnxruntime's quantizer refused this plan: it is out
        quantized, check = source, {"tolerance_failed": f"int8 failed: {exc}"}
    else:
        check = checker(quantized, "latency")
        why = checker.fails(check)  # no back-off inside an int8 model: it is out if it fails
        if why:
            check["tolerance_failed"] = why
    rounds.add({"budget": budget, "int8": True, **check}, plan, quantized, refit, check, restored)
    return check


def _retime(rounds: Rounds, checker) -> None:
    """Time every round that may be kept (all but failed int8 ones) again, all together with
    the original in RETIME_WINDOWS windows; each round's ratio is then the median of those
    windows alone, its search's kept as `latency_ratio_search` (windows as
    `latency_windows_search`); timed again after more rounds, the newest windows alone."""
    timed = [
        i for i, r in enumerate(rounds)
        if "latency_ratio" in r and not _failed_whole(r)
    ]  # fmt: skip
    if not timed:
        return
    windows = checker.windows(
        {str(i): rounds.built[i].model for i in timed}, RETIME_WINDOWS, "timing the plans again"
    )
    for i in timed:
        round_ = rounds[i]
        earlier = round_.pop("latency_windows", [])  # timed again before: only the newest
        round_.setdefault("latency_windows_search", earlier)
        round_.setdefault("latency_ratio_search", round_["latency_ratio"])
        _add_windows(round_, [_ratio(w, str(i)) for w in windows])


def _search_again(rounds: Rounds, build, bounds, max_error) -> bool:
    """When the re-timing put every usable round off target (the machine's state moved since
    the search stopped on one; see docs/decisions.md#search-on-after-the-re-timing), tighten
    the float plans on from the re-timed ratios with the rounds the search has left. True when
    it built more."""
    options = build[4]
    target = options.budget()[1]
    if rounds[_best_round(rounds, target, max_error)]["latency_ratio"] <= target + LATENCY_SLACK:
        return False
    floats = [
        i for i, r in enumerate(rounds)
        if not r.get("int8") and not r.get("blocks") and "latency_ratio" in r
    ]  # fmt: skip
    usable = [i for i in floats if not _breaks(rounds[i], max_error)]
    floor, scale = bounds
    if not usable or len(floats) >= LATENCY_ROUNDS:
        return False
    fastest = rounds[min(usable, key=lambda i: rounds[i]["latency_ratio"])]
    if fastest["budget"] <= floor:
        return False
    on = [rounds[i]["budget"] for i in floats if rounds[i]["latency_ratio"] <= target]
    met = max(on) if on else None
    if met is not None:  # a broken plan met it: bisect between the two
        budget = (met + fastest["budget"]) / 2
    else:
        budget = max(floor, fastest["budget"] - (fastest["latency_ratio"] - target) * scale)
    known = (met, fastest["budget"])
    more = _latency_rounds(
        *build, (budget, floor, scale), known=known, count=LATENCY_ROUNDS - len(floats)
    )
    rounds.merge(more)
    return bool(more)


def _confirmed(check: dict, model, checker, target: float) -> float:
    """The round's ratio, timed in CONFIRM_WINDOWS more windows first when it is within
    CONFIRM_BAND of the target: the search stops on such a round or steps by a little from
    it, so a few lucky windows must not decide (see
    docs/decisions.md#confirm_band-confirm_windows)."""
    if abs(check["latency_ratio"] - target) <= CONFIRM_BAND:
        windows = checker.windows({"compressed": model}, CONFIRM_WINDOWS)
        _add_windows(check, [_ratio(w, "compressed") for w in windows])
    return check["latency_ratio"]


def _add_windows(check: dict, ratios: list[float]) -> None:
    """Record more windows' ratios in a check; its ratio is the median of all of them."""
    check["latency_windows"] = check.get("latency_windows", []) + ratios
    check["latency_ratio"] = round(float(np.median(check["latency_windows"])), 4)


def _ratio(timing: dict, name: str) -> float:
    """A model's latency over the original's in one timing window."""
    return round(1 / benchmark.speedup(timing, "original", name), 4)


def _floor(tables, kind: str) -> float:
    """The tabled layers' cost with every layer at its cheapest candidate."""
    return sum(min(s.cost(kind) for s in t.all()) for t in tables)


def _factorized(plan: dict) -> bool:
    """Whether a plan rewrites any layer (a plan of all keeps is the original model)."""
    return any(s.method != "keep" for s in plan.values())


def run_sensitivity(model, choices, options, context, sample, factory) -> dict[str, list]:
    """Damage of every candidate, one job per layer, through the executor."""
    jobs = jobs_of(options, context)
    threads = executor.threads_per_job(jobs, context.threads)
    with tempfile.TemporaryDirectory(prefix="onnxcompress-auto-") as folder:
        model_path = os.path.join(folder, "model.onnx")
        onnx.save(model, model_path)
        data_path = None
        if sample:
            data_path = os.path.join(folder, "data.npz")
            sensitivity.save_batches(sample, data_path)
        factory_options = {"methods": options.method_names(), "align": options.align}
        work = [
            sensitivity.SensitivityJob(
                model_path,
                data_path,
                factory,
                factory_options,
                c.name,
                context.input_shapes,
                threads,
                context.seed,
            )  # fmt: skip
            for c in choices
        ]
        found: dict[str, list] = {}
        with (
            context.progress("sensitivity per layer", len(work)) as bar,
            executor.make_executor(jobs) as pool,
        ):
            results = pool.map(sensitivity.measure_layer, work)
            for job, result in zip(work, results, strict=True):
                found[job.layer] = result
                bar.advance()
    return found


def _best_round(rounds: list[dict], target: float | None, max_error: float | None = None) -> int:
    """The round to keep: of those on the latency target (all, for other budgets), the one
    with the smallest measured output error (the largest budget when no data measured it);
    with none on target, the least error among those within MISSED_TIE of the fastest. An
    int8 round that failed the tolerance is out; so is one whose output error is over
    `max_error` while any other is left (a plan that breaks the outputs is not kept for speed
    while one that works is at hand)."""
    rounds_left = [i for i, r in enumerate(rounds) if not _failed_whole(r)]
    usable = [i for i in rounds_left if not _breaks(rounds[i], max_error)]
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


def usable_error(options) -> float | None:
    """The output error over which a plan counts as broken: none when the user set a
    tolerance (the back-off and the checks hold plans to it), else the level the
    factorization passes warn at."""
    if options.max_rel_l2 is not None or options.max_accuracy_drop is not None:
        return None
    return CLIFF_ERROR


def _breaks(round_: dict, max_error: float | None) -> bool:
    """Whether a round's measured output error is over `max_error` (never, without a bar)."""
    return max_error is not None and round_.get("rel_l2", 0.0) > max_error


def _broken_faster(rounds: list[dict], chosen: int, max_error: float | None) -> dict | None:
    """The fastest round passed over for breaking the outputs, when it was faster than the
    kept one (what the user gave up by not loosening the tolerance)."""
    kept = rounds[chosen]
    if _breaks(kept, max_error):
        return None
    broken = [
        r for r in rounds if _breaks(r, max_error) and r["latency_ratio"] < kept["latency_ratio"]
    ]
    if not broken:
        return None
    fastest = min(broken, key=lambda r: r["latency_ratio"])
    return {"latency_ratio": fastest["latency_ratio"], "rel_l2": fastest["rel_l2"]}


def jobs_of(options, context: PassContext) -> int:
    """Worker processes: the pass's own `jobs` option, else the run's `--jobs`."""
    return options.jobs or context.jobs


def timing_feeds(model, context: PassContext) -> dict[str, np.ndarray]:
    """Inputs in the shapes the layers were timed at: the first calibration samples, joined
    across batches when the pinned batch is larger than one calibration batch, else random
    data."""
    rows = max((shape[0] for shape in context.input_shapes.values()), default=1)
    if context.calibration and sample_count(context.calibration) >= rows:
        samples = first_samples(context.calibration, rows)
        joined = {name: np.concatenate([s[name] for s in samples]) for name in samples[0]}
        return {
            name: value[: context.input_shapes.get(name, value.shape)[0]]
            for name, value in joined.items()
        }
    return random_inputs(model, context.input_shapes, count=1, seed=context.seed)[0]


def latency_ratio(model, other, context: PassContext) -> float:
    """`other`'s latency over `model`'s: the median of CONFIRM_WINDOWS windows of the two
    timed side by side, as the search times its plans."""
    feeds = timing_feeds(model, context)
    windows = [
        _window(model, {"other": other}, feeds, context.threads) for _ in range(CONFIRM_WINDOWS)
    ]
    return round(float(np.median([_ratio(w, "other") for w in windows])), 4)


def _window(original, models: dict[str, Any], feeds, threads: int) -> dict:
    """One timing window: `original` (named so) and `models` side by side."""
    return benchmark.benchmark_models(
        {"original": original, **models},
        feeds,
        threads=threads,
        repeats=20,
        min_seconds=WINDOW_SECONDS,
    )


def _model_total(kind, model, analysis, feeds, threads) -> float:
    if kind == "macs":
        return float(analysis.total_macs)
    if kind == "bytes":
        return float(graph.weight_bytes(model))
    timing = benchmark.benchmark_models(
        {"original": model}, feeds, threads=threads, repeats=50, min_seconds=TIMING_SECONDS
    )
    return float(timing["original"]["median_ms"])


class _Checker:
    """Whole-model checks against the original: latency (same run) and output fidelity."""

    def __init__(self, model, context, feeds, options) -> None:
        self.model, self.context, self.feeds, self.options = model, context, feeds, options
        self.reference = sensitivity.run_outputs(model, context) if context.calibration else None

    def __call__(self, compressed, kind: str) -> dict[str, Any]:
        check: dict[str, Any] = {}
        if self.reference is not None:
            outputs = sensitivity.run_outputs(compressed, self.context)
            damage, agreement = sensitivity.output_damage(self.reference, outputs)
            check["rel_l2"] = round(float(np.sqrt(damage)), 6)
            if agreement is not None:
                check["agreement"] = round(agreement, 6)
            drop = accuracy_drop(self.reference[0], outputs[0], self.context.labels)
            if drop is not None:
                check["accuracy_drop"] = round(drop, 4)
        if kind == "latency":
            windows = self.windows({"compressed": compressed}, CHECK_WINDOWS)
            _add_windows(check, [_ratio(w, "compressed") for w in windows])
            ms = [w["compressed"]["median_ms"] for w in windows]
            check["latency_ms"] = round(float(np.median(ms)), 4)
        return check

    def windows(self, models: dict[str, Any], count: int, step: str = "") -> list[dict]:
        """`count` timings of the original with `models`, side by side in each; shown as a
        progress step when it has a name."""
        steps = range(count)
        if step:
            steps = track(self.context.progress, step, steps)
        return [_window(self.model, models, self.feeds, self.context.threads) for _ in steps]

    def fails(self, check: dict[str, Any]) -> str:
        """Why the check fails the user's tolerance ("" when it holds or none was set)."""
        tol, drop = self.options.max_rel_l2, self.options.max_accuracy_drop
        if tol is not None and check.get("rel_l2", 0.0) > tol:
            return f"rel L2 {check['rel_l2']:.4f} > max_rel_l2 {tol:g}"
        if drop is not None and check.get("accuracy_drop", 0.0) > drop:
            return f"top-1 accuracy drop {check['accuracy_drop']:.2f} points > {drop:g}"
        if drop is not None and "accuracy_drop" not in check and "agreement" in check:
            if 100 * (1 - check["agreement"]) > drop:
                return f"top-1 agreement {100 * check['agreement']:.2f} % < {100 - drop:g} %"
        return ""


def accuracy_drop(reference: np.ndarray, outputs: np.ndarray, labels) -> float | None:
    """Top-1 accuracy points lost on the calibration samples, when labels came with them and
    the first output holds class scores; else None (the agreement stands in for it)."""
    if labels is None or outputs.ndim != 2 or len(labels) != len(outputs):
        return None
    labels = np.asarray(labels).reshape(-1)
    before = np.mean(reference.argmax(1) == labels)
    return float(100 * (before - np.mean(outputs.argmax(1) == labels)))


def _build_and_check(model, plan, tables, methods, context, options, checker):
    """Build the plan on `model`, refit to its outputs; while the
    whole-model check fails the tolerance, restore the most damaging rewritten layer and
    rebuild. Returns (model, refit, check, restored layers)."""
    restored: list[str] = []
    kind = options.budget()[0]
    while True:
        compressed, refit = auto_plan.apply_plan(
            model, plan, tables, methods, context, options.refit
        )
        check = checker(compressed, kind)
        why = checker.fails(check)
        layer = auto_plan.restore_worst(tables, plan) if why else None
        if layer is None:
            if why:
                check["tolerance_failed"] = why
            return compressed, refit, check, restored
        log.info("auto: %s; restored %s", why, layer)
        restored.append(layer)


def _summary(kind, target, tables, plan, rounds, kept, backed_off, refit, total, rest) -> dict:
    layers = []
    for table in tables:
        chosen = plan[table.choice.name]
        layers.append(
            {
                "node": table.choice.name,
                "op": table.choice.op,
                "method": chosen.method,
                "config": chosen.config,
                "macs_before": table.keep.macs,
                "macs_after": chosen.macs,
                "params_before": table.keep.params,
                "params_after": chosen.params,
                "latency_ms_before": round(table.keep.latency_ms, 4),
                "latency_ms_after": round(chosen.latency_ms, 4),
                "damage": chosen.damage,
            }
        )
    candidates = [
        {
            "node": s.layer,
            "method": s.method,
            "config": s.config,
            "latency_ms": round(s.latency_ms, 4),
            "macs": s.macs,
            "damage": s.damage,
        }
        for t in tables
        for s in t.options
    ]
    return {
        "budget": {"kind": kind, "target": target},
        "layers": layers,
        "candidates": candidates,
        "curve": _curve(tables, kind, plan, total, rest),
        "backed_off": backed_off,
        "rounds": list(rounds),  # the entries alone: what was built stays out of the report
        "chosen_round": kept,
        "model": rounds[kept],
        "refit": refit,
    }


def _curve(tables: list[LayerTable], kind, plan, total, rest) -> list[dict]:
    """The allocator's best plans from the cheapest to the full cost (predicted cost ratio
    and total damage), and the chosen plan marked."""
    points = [
        {"cost_ratio": round((rest + cost) / total, 4), "damage": damage, "chosen": False}
        for cost, damage in auto_plan.curve(tables, kind, CURVE_POINTS)
    ]
    return points + [_point(plan, kind, total, rest, True)]


def _point(plan: dict[str, Scored], kind, total, rest, chosen: bool) -> dict:
    cost = rest + sum(s.cost(kind) for s in plan.values())
    damage = sum(s.damage for s in plan.values())
    return {"cost_ratio": round(cost / total, 4), "damage": damage, "chosen": chosen}


def mark_precision(records: list[NodeRecord], summary: dict, quantized: onnx.ModelProto) -> None:
    """When the kept model is int8, say per layer (records, and the summary's layer table)
    whether it runs in int8 (read off the model: its weight comes from a DequantizeLinear; a
    factorized layer's factors are quantized with the rest) or stayed in float, and why."""
    int8_layers = graph.int8_layers(quantized)
    slower = summary["int8"]["float_layers"]
    layers = {layer["node"]: layer for layer in summary["layers"] if layer["method"] != "removed"}
    for record in records:
        if record.details.get("method") == "removed":
            continue
        in_int8 = record.status == "rewritten" or record.node in int8_layers
        if record.node in layers:
            layers[record.node]["int8"] = in_int8
        if record.status == "rewritten":
            record.details["int8"] = True
        elif in_int8:
            record.status, record.reason, record.details = "rewritten", "", {"int8": True}
        else:
            why = (
                "its int8 kernel is slower" if record.node in slower
                else "next to a float layer, or the quantizer's choice"
            )  # fmt: skip
            record.reason = "; ".join(filter(None, [record.reason, f"in float in int8: {why}"]))


def _records(tables: list[LayerTable], plan, backed_off: list[str]) -> list[NodeRecord]:
    records = []
    for table in tables:
        name, chosen = table.choice.name, plan[table.choice.name]
        base = dict(macs_before=table.keep.macs, params_before=table.keep.params)
        if chosen.method == "keep":
            why = (
                "restored by the whole-model back-off" if name in backed_off
                else "kept: the budget was met without it"
            )  # fmt: skip
            status = "reverted" if name in backed_off else "skipped"
            records.append(NodeRecord(name, table.choice.op, status, why, **base))
            continue
        details = {
            "method": chosen.method,
            **chosen.config,
            "damage": chosen.damage,
            "timing": {
                "original_ms": round(table.keep.latency_ms, 4),
                "rewritten_ms": round(chosen.latency_ms, 4),
            },
        }
        records.append(
            NodeRecord(
                name,
                table.choice.op,
                "rewritten",
                "",
                params_after=chosen.params,
                macs_after=chosen.macs,
                details=details,
                **base,
            )  # fmt: skip
        )
    return records
