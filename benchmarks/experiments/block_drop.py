"""What removing whole residual blocks costs and buys on ResNet-20: the one lever per-layer
rewrites do not have (at batch 1 on 2 threads most of its time is the per-op cost of handing
work to the thread pool, which only fewer ops remove).

Per identity block (`onnxcompress.residual_blocks`): top-1 on the evaluation images with that
block alone removed, before and after refitting the convs and linear layers after it (the
classifier too) on the calibration data.
Then blocks removed together, least damaging first by that top-1 (the `blocks` pass ranks on
calibration outputs instead), each model refit, all timed in one interleaved loop against the
original at batch 1 and at `--batch`.

    python benchmarks/experiments/block_drop.py --threads 2 --batch 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.image_models import add_data_arguments, latency_inputs, resnet20  # noqa: E402
from onnxcompress.benchmark import benchmark_models  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402
from onnxcompress.residual_blocks import identity_blocks, refit_after, without_blocks  # noqa: E402


def measure(bench, args) -> str:
    context = PassContext(bench.input_shapes, calibration=bench.calibration, threads=args.threads)
    base = bench.score(bench.model, args.threads)["top1"]
    blocks = identity_blocks(bench.model)
    lines = [
        f"### Each block removed alone ({len(blocks)} identity blocks; top-1 "
        f"{base:.2f} for the original)",
        "",
        "| block | top-1 | Δ | refit layers | top-1 refit | Δ refit |",
        "|---|---|---|---|---|---|",
    ]
    after_refit = {}
    for block in blocks:
        dropped = without_blocks(bench.model, [block])
        refit, summary = refit_after(bench.model, dropped, context)
        plain = bench.score(dropped, args.threads)["top1"]
        after_refit[block] = bench.score(refit, args.threads)["top1"]
        lines.append(
            f"| {block.add} | {plain:.2f} | {plain - base:+.2f} | {summary['layers']} "
            f"| {after_refit[block]:.2f} | {after_refit[block] - base:+.2f} |"
        )
    ranked = sorted(blocks, key=lambda b: -after_refit[b])
    models, scores = {"original": bench.model}, {"original": base}
    for count in range(1, len(ranked) + 1):
        label = f"{count} removed"
        models[label], _ = refit_after(
            bench.model, without_blocks(bench.model, ranked[:count]), context
        )
        scores[label] = bench.score(models[label], args.threads)["top1"]
    return "\n".join([*lines, "", *_removed_together(bench, ranked, models, scores, args)])


def _removed_together(bench, ranked, models, scores, args) -> list[str]:
    feeds = latency_inputs(bench.model, bench.evaluation, (args.batch,))
    timing = {
        batch: benchmark_models(models, feeds[batch], args.threads, repeats=args.repeats)
        for batch in sorted(feeds)
    }
    head = " | ".join(f"latency b{b}" for b in timing)
    lines = [
        "### Blocks removed together, least damaging first, refit",
        "",
        f"Order: {', '.join(b.add for b in ranked)}. Latency: the median over "
        f"{args.repeats} interleaved runs, as a ratio to the original's.",
        "",
        f"| model | nodes | {head} | top-1 | Δ |",
        "|---|---|" + "---|" * len(timing) + "---|---|",
    ]
    for label, model in models.items():
        ratios = " | ".join(
            f"{t[label]['median_ms'] / t['original']['median_ms']:.3f}" for t in timing.values()
        )
        lines.append(
            f"| {label} | {len(model.graph.node)} | {ratios} | {scores[label]:.2f} "
            f"| {scores[label] - scores['original']:+.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, calib_count=512, eval_count=2000)
    parser.add_argument("--batch", type=int, default=8, help="timed besides batch 1")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)
    print(
        f"`{' '.join(['python benchmarks/experiments/block_drop.py', *(argv or sys.argv[1:])])}`\n"
    )
    print(measure(resnet20(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
