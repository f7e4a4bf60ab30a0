"""`auto`'s search: sensitivity runs (in parallel), cost tables, allocation, then rounds of
plans built, refit and checked on the whole model (float, int8, blocks removed), re-timed
together at the end; the round on target with the least output error is kept."""

from __future__ import annotations

from onnxcompress import executor
from onnxcompress.auto import plan as auto_plan
from onnxcompress.auto import sensitivity as sensitivity
from onnxcompress.auto import summary as auto_summary
from onnxcompress.auto.block_rounds import block_rounds, mark_removed
from onnxcompress.auto.checks import (
    RETIME_WINDOWS,
    Checker,
    add_windows,
    model_total,
    timing_feeds,
    window_ratio,
)
from onnxcompress.auto.choice import (
    LATENCY_SLACK,
    best_round,
    best_round_and_why,
    breaks,
    broken_faster,
    failed_whole,
)
from onnxcompress.auto.int8_rounds import int8_rounds, int8_table_rounds, mixed_on_target
from onnxcompress.auto.rounds import LATENCY_ROUNDS, PLANS_LOOP, Rounds, Search
from onnxcompress.auto.settings import SearchSettings
from onnxcompress.errors import CompressError
from onnxcompress.factorization import CLIFF_ERROR
from onnxcompress.passkit import PassContext, PassResult, first_samples, sample_count

SENSITIVITY_LOOP, TIMING_LOOP, RETIME_LOOP = (
    "sensitivity per layer",
    "timing candidates",
    "timing the plans again",
)
# The search's share of time per loop, for the CLI's estimate of the time left; see
# docs/decisions.md#outline
OUTLINE = {SENSITIVITY_LOOP: 0.68, TIMING_LOOP: 0.04, PLANS_LOOP: 0.24, RETIME_LOOP: 0.04}


def search(
    model,
    analysis,
    choices,
    methods,
    settings: SearchSettings,
    context: PassContext,
    quantize=None,
    quantize_layer=None,
    factory: str = "",
) -> PassResult:
    """The whole search; the result's summary is the `auto` section of the report.
    `factory` ("module:function") makes the methods in sensitivity worker processes.
    `quantize(model) -> model` (int8), when given, is tried on the original and the best plan;
    with `quantize_layer(model, feeds) -> model` too, plans are also chosen on int8 timings."""
    kind, target = settings.kind, settings.target
    context.outline(OUTLINE)
    sample = first_samples(context.calibration, settings.sensitivity_samples)
    in_graph = kind == "latency" and settings.latency_basis == "graph"
    with open_executor(settings, context) as pool:
        measured = run_sensitivity(model, choices, settings, context, sample, factory, pool)
        with context.progress(TIMING_LOOP, sum(len(c.candidates) for c in choices)) as bar:
            tables = auto_plan.score_layers(
                model, choices, measured, context.threads, bar, not in_graph, pool
            )
    feeds = timing_feeds(model, context)
    if in_graph:
        count = sum(len(t.options) for t in tables)
        with context.progress("timing candidates in the model", count) as bar:
            auto_plan.time_in_graph(model, tables, measured, feeds, context.threads, bar)
    total = model_total(kind, model, analysis, feeds, context.threads)
    budget, rest, scale = auto_plan.budget_for(kind, target, tables, total)
    floor = auto_plan.floor(tables, kind)
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
    state = Search(
        model, tables, methods, context, settings, Checker(model, context, feeds, settings)
    )
    rounds = state.latency_rounds((budget, floor, scale))
    if out_of_reach:
        rounds[0]["estimate"] = out_of_reach + "; built and measured instead"
    on_latency = settings.latency_target
    max_error = settings.usable_error(CLIFF_ERROR)
    # Per kind of cost: the tables, and the rest and total their ratios are taken with.
    cost_tables = {"float": (tables, rest, scale)}
    int8_timed = None  # the layers (and candidates) timed in int8, for the report
    if quantize and on_latency and context.calibration:
        best = best_round(rounds, on_latency, max_error)
        original_int8 = int8_rounds(state, rounds.built[best], rounds, quantize)
        if quantize_layer and original_int8 and original_int8 > target + LATENCY_SLACK:
            cost_tables["int8"], more = int8_table_rounds(
                state, measured, quantize, quantize_layer, original_int8, total
            )
            rounds.merge(more)
            int8_timed = cost_tables["int8"][0]
        elif quantize_layer and original_int8:
            int8_timed = mixed_on_target(state, measured, quantize, quantize_layer, rounds)
    blocks = None
    if on_latency and settings.blocks:
        # Per-layer plans on the model with blocks removed never won (docs/decisions.md
        # #plan_after_blocks_rounds): the block rounds stand alone.
        blocks = block_rounds(state, quantize, rounds, max_error)
    if on_latency:
        retime(rounds, state.checker)
        if search_again(rounds, state, (floor, scale), max_error):
            retime(rounds, state.checker)
    chosen, why = best_round_and_why(rounds, on_latency, max_error)
    costs = cost_tables[rounds[chosen].get("costs", "float")]
    plan, compressed, _, _, backed_off = rounds.built[chosen]
    timed = (tables, int8_timed)
    summary = auto_summary.auto_section(settings, costs, rounds, chosen, timed)
    summary["kept_because"] = why
    if kind == "latency":  # measured on the whole model, not predicted
        summary["target_reached"] = rounds[chosen]["latency_ratio"] <= target + LATENCY_SLACK
        summary["broken_over"] = max_error
        broken = broken_faster(rounds, chosen, max_error)
        if broken:
            summary["broken_faster"] = broken
    summary["sensitivity"] = {
        "basis": "outputs" if sample else "weights (no calibration data)",
        "samples": sample_count(sample),
        "jobs": settings.jobs,
        "executor": context.executor,
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
    records = auto_summary.node_records(costs[0], plan, backed_off)
    removed = rounds[chosen].get("blocks", [])
    if blocks is not None:
        summary["blocks"] = {**blocks, "removed": removed}
        mark_removed(records, summary, model, removed)
    changed = quantized or auto_plan.factorized(plan) or bool(removed)
    return PassResult(compressed if changed else model, changed, records, summary)


def retime(rounds: Rounds, checker) -> None:
    """Time every round that may be kept (all but failed int8 ones) again, all together with
    the original in RETIME_WINDOWS windows; each round's ratio is then the median of those
    windows alone, its search's kept as `latency_ratio_search` (windows as
    `latency_windows_search`); timed again after more rounds, the newest windows alone."""
    timed = [
        i for i, r in enumerate(rounds)
        if "latency_ratio" in r and not failed_whole(r)
    ]  # fmt: skip
    if not timed:
        return
    windows = checker.windows(
        {str(i): rounds.built[i].model for i in timed}, RETIME_WINDOWS, RETIME_LOOP
    )
    for i in timed:
        round_ = rounds[i]
        earlier = round_.pop("latency_windows", [])  # timed again before: only the newest
        round_.setdefault("latency_windows_search", earlier)
        round_.setdefault("latency_ratio_search", round_["latency_ratio"])
        add_windows(round_, [window_ratio(w, str(i)) for w in windows])


def search_again(rounds: Rounds, state: Search, bounds, max_error) -> bool:
    """When the re-timing put every usable round off target (the machine's state moved since
    the search stopped on one; see docs/decisions.md#search-on-after-the-re-timing), tighten
    the float plans on from the re-timed ratios with the rounds the search has left. True when
    it built more."""
    target = state.settings.target
    if rounds[best_round(rounds, target, max_error)]["latency_ratio"] <= target + LATENCY_SLACK:
        return False
    floats = [
        i for i, r in enumerate(rounds)
        if not r.get("int8") and not r.get("blocks") and "latency_ratio" in r
    ]  # fmt: skip
    usable = [i for i in floats if not breaks(rounds[i], max_error)]
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
    more = state.latency_rounds(
        (budget, floor, scale), known=known, count=LATENCY_ROUNDS - len(floats)
    )
    rounds.merge(more)
    return bool(more)


def open_executor(settings: SearchSettings, context: PassContext) -> executor.Executor:
    """The executor of the search's jobs: local (serial, or `settings.jobs` processes) or the
    Ray cluster the context names."""
    return executor.make_executor(settings.jobs, kind=context.executor, address=context.ray_address)


def run_sensitivity(model, choices, settings, context, sample, factory, pool) -> dict[str, list]:
    """Damage of every candidate, one job per layer, through `pool`."""
    # Remote jobs take one CPU each: the cluster's CPUs are the parallelism.
    threads = 1 if pool.remote else executor.threads_per_job(settings.jobs, context.threads)
    shared_model, shared_data, digest = sensitivity.share_inputs(pool, model, sample)
    factory_options = {"methods": list(settings.methods), "align": settings.align}
    work = [
        sensitivity.SensitivityJob(
            shared_model,
            shared_data,
            digest,
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
    with context.progress(SENSITIVITY_LOOP, len(work)) as bar:
        results = pool.map(sensitivity.measure_layer, work)
        for job, result in zip(work, results, strict=True):
            found[job.layer] = result
            bar.advance()
    return found
