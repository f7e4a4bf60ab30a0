"""Does a model's latency ratio depend on how many models share its timing windows?

`auto` times a plan in the search with the original alone (a pair per window) and at the end
with every plan together; the benchmark times all its rows in one long loop. Here ResNet-20's
int8, cp and svd models (MACs budgets 0.5 and 0.35) and cp + int8 are timed the three ways
in each trial: five 0.5 s windows per model paired with the original, five 0.5 s windows of
all models together, and one 100-repeat loop of all together (each a median ratio to the
original). Repeated trials show what moves between trials (the machine) against what moves
between ways.

    python benchmarks/experiments/window_size.py --threads 1 --trials 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.experiments.int8_mixed import run_pass  # noqa: E402
from benchmarks.image_models import add_data_arguments, resnet20  # noqa: E402
from onnxcompress.auto.checks import RETIME_WINDOWS, WINDOW_SECONDS  # noqa: E402
from onnxcompress.benchmark import benchmark_models  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402

WAYS = ("pair", "together", "long")


def build(bench, context: PassContext, budgets=("0.5", "0.35")) -> dict:
    models = {"int8": run_pass("int8", bench.model, context)}
    for budget in budgets:
        cp = run_pass("cp", bench.model, context, target_macs=budget, align=8)
        models[f"cp@{budget}"] = cp
        models[f"cp@{budget}+int8"] = run_pass("int8", cp, context)
        models[f"svd@{budget}"] = run_pass("svd", bench.model, context, target_macs=budget, align=8)
    return models


def ratios(original, models: dict, feeds, threads: int, **timing) -> dict[str, float]:
    """Each model's median latency over the original's, all timed in one loop."""
    measured = benchmark_models({"original": original, **models}, feeds, threads=threads, **timing)
    base = measured["original"]["median_ms"]
    return {label: measured[label]["median_ms"] / base for label in models}


def trial(original, models: dict, feeds, threads: int) -> dict[str, dict[str, float]]:
    """{model: {way: ratio}} for one trial."""
    window = {"repeats": 20, "min_seconds": WINDOW_SECONDS}
    pair = {label: [] for label in models}
    together = {label: [] for label in models}
    for _ in range(RETIME_WINDOWS):
        for label, model in models.items():
            pair[label] += ratios(original, {label: model}, feeds, threads, **window).values()
        for label, value in ratios(original, models, feeds, threads, **window).items():
            together[label].append(value)
    long = ratios(original, models, feeds, threads, warmup=2, repeats=100)
    return {
        label: {"pair": float(np.median(pair[label])),
                "together": float(np.median(together[label])), "long": long[label]}
        for label in models
    }  # fmt: skip


def table(trials: list[dict[str, dict[str, float]]]) -> str:
    """One row per model: every trial's three ratios, then the median over trials of
    together − pair and long − pair."""
    labels = list(trials[0])
    head = [f"trial {i} {way}" for i in range(len(trials)) for way in WAYS]
    lines = [
        "| model | " + " | ".join(head) + " | together − pair | long − pair |",
        "|---" * (len(head) + 3) + "|",
    ]
    for label in labels:
        cells = [f"{t[label][way]:.3f}" for t in trials for way in WAYS]
        gaps = [
            np.median([t[label][way] - t[label]["pair"] for t in trials])
            for way in ("together", "long")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gaps[0]:+.3f} | {gaps[1]:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, calib_count=300, eval_count=100)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args(argv)
    bench = resnet20(args)
    context = PassContext(bench.input_shapes, calibration=bench.calibration, threads=args.threads)
    models = build(bench, context)
    feeds = bench.latency_inputs[1]
    trials = [trial(bench.model, models, feeds, args.threads) for _ in range(args.trials)]
    print(f"`python benchmarks/experiments/window_size.py {' '.join(argv or sys.argv[1:])}`\n")
    print(f"ResNet-20, {args.threads} thread(s); latency ratios to the original\n")
    print(table(trials))
    return 0


if __name__ == "__main__":
    sys.exit(main())
