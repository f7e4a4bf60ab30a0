"""Does int8 compose with factorization if only the layers a method left whole are quantized?

For each method and MACs budget, ResNet-20 is factorized (align 8, refit on the calibration
images) and three models are measured against the original and int8 of the original: the
float result, int8 everywhere (`M+int8`), and int8 with every factor node kept in float
(`M+int8 whole only`, the per-layer mixed precision a planner could choose). Top-1 on the
CIFAR-10 test subset and batch-1 latency, all models timed in one interleaved loop.

    python benchmarks/experiments/int8_mixed.py --methods cp,svd --budgets 0.5,0.35 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from onnxcompress.passes import get_pass  # noqa: E402

from benchmarks.image_models import add_data_arguments, resnet20  # noqa: E402
from onnxcompress import graph  # noqa: E402
from onnxcompress.benchmark import benchmark_models  # noqa: E402
from onnxcompress.passkit import PassContext, comma_list  # noqa: E402

# Node-name suffixes the factorization builders give their factors.
FACTOR_TAGS = (".cp_", ".svd_", ".tucker2_", ".fga_")


def run_pass(name: str, model, context: PassContext, **options):
    spec = get_pass(name)
    return graph.cleanup_and_sort(spec.run(model, spec.make_options(options), context).model)


def factor_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if any(tag in n.name for tag in FACTOR_TAGS)]


def build(bench, context: PassContext, methods: list[str], budgets: list[str]) -> dict:
    models = {"original": bench.model, "int8": run_pass("int8", bench.model, context)}
    for method in methods:
        for budget in budgets:
            label = f"{method}@{budget}"
            factored = run_pass(method, bench.model, context, target_macs=budget, align=8)
            models[label] = factored
            models[f"{label}+int8"] = run_pass("int8", factored, context)
            keep = ",".join(factor_nodes(factored))
            models[f"{label}+int8 whole only"] = run_pass("int8", factored, context, keep=keep)
    return models


def table(
    models: dict, scores: dict, timing: dict, metric: str = "top1", heading: str = "top-1"
) -> str:
    """Per model: batch-1 latency and `metric` with its change, both against "original"."""
    base_ms, base = timing["original"]["median_ms"], scores["original"][metric]
    lines = [f"| model | latency b1 | {heading} | Δ |", "|---|---|---|---|"]
    for label in models:
        ratio = timing[label]["median_ms"] / base_ms
        value = scores[label][metric]
        lines.append(f"| {label} | {ratio:.3f} | {value:.2f} | {value - base:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="cp,svd")
    parser.add_argument("--budgets", default="0.5,0.35")
    add_data_arguments(parser, calib_count=512, eval_count=2000)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)
    bench = resnet20(args)
    context = PassContext(bench.input_shapes, calibration=bench.calibration, threads=args.threads)
    models = build(bench, context, comma_list(args.methods), comma_list(args.budgets))
    scores = {label: bench.score(model, args.threads) for label, model in models.items()}
    timing = benchmark_models(
        models, bench.latency_inputs[1], threads=args.threads, repeats=args.repeats
    )
    print(
        f"`{' '.join(['python benchmarks/experiments/int8_mixed.py', *(argv or sys.argv[1:])])}`\n"
    )
    print(table(models, scores, timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
