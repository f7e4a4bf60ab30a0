"""What would removing whole residual blocks buy? It is the one lever per-layer rewrites do
not have: at batch 1 on 2 threads most of ResNet-20's time is the per-op cost of handing work
to the thread pool (README, the done-when at 2 threads), which only fewer ops remove.

A block whose shortcut is the identity computes Add(x, branch(x)) (then Relu, where x is
already a Relu output, so Relu(x) = x): without its branch it is x itself. Per such block,
top-1 with that block alone removed, before and after refitting every conv after it (least
squares on calibration data, each to its output in the original, in graph order, as the
factorization passes refit). Then blocks removed together, least damaging first (by top-1
after refit), each model refit, and all of them timed in one interleaved loop against the
original, at batch 1 and at `--batch`.

    python benchmarks/block_drop.py --threads 2 --batch 8
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image_models import add_data_arguments, latency_inputs, resnet20  # noqa: E402
from onnxcompress import graph  # noqa: E402
from onnxcompress.benchmark import benchmark_models  # noqa: E402
from onnxcompress.layer_refit import RefitSite, refit_layers  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402

# What a branch may hold: ops whose first input is the activation (Clip: Relu6).
BRANCH_OPS = ("Conv", "BatchNormalization", "Relu", "Clip")
MAX_BRANCH = 12  # nodes on a block's branch, walking back from the Add


@dataclass(frozen=True)
class Block:
    add: str  # the Add node's name
    input: str  # x: the shortcut, the block's input
    output: str  # what later nodes read: the Relu after the Add when x is a Relu's, else the Add


def identity_blocks(model: onnx.ModelProto) -> list[Block]:
    """The blocks of `model` whose shortcut is the identity, in graph order: an Add of x and a
    branch of `BRANCH_OPS` nodes that starts from x."""
    made_by = graph.producers(model)
    read_by = graph.consumers(model)
    blocks = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for x, branch in (node.input, reversed(node.input)):
            if _branch_starts_at(made_by, branch, x):
                blocks.append(Block(node.name, x, _block_output(node, x, made_by, read_by)))
                break
    return blocks


def _branch_starts_at(made_by: dict, tensor: str, start: str) -> bool:
    for _ in range(MAX_BRANCH):
        node = made_by.get(tensor)
        if node is None or node.op_type not in BRANCH_OPS:
            return False
        tensor = node.input[0]
        if tensor == start:
            return True
    return False


def _block_output(add, x: str, made_by: dict, read_by: dict) -> str:
    """The Relu after the Add when x is itself a Relu's output (Relu(x) = x): it goes too."""
    after = read_by.get(add.output[0], [])
    x_is_relu = made_by.get(x) is not None and made_by[x].op_type == "Relu"
    if x_is_relu and len(after) == 1 and after[0].op_type == "Relu":
        return after[0].output[0]
    return add.output[0]


def without_blocks(model: onnx.ModelProto, blocks: list[Block]) -> onnx.ModelProto:
    """`model` with the branches of `blocks` removed: what read a block's output reads its
    input. Later blocks first, so that a block reading a removed one's output ends on the
    input of the first one removed."""
    order = {node.name: i for i, node in enumerate(model.graph.node)}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    outputs = {o.name for o in result.graph.output}
    for block in sorted(blocks, key=lambda b: order[b.add], reverse=True):
        if block.output in outputs:
            raise ValueError(f"block {block.add}: its output is a graph output")
        for node in result.graph.node:
            node.input[:] = [block.input if n == block.output else n for n in node.input]
    return graph.cleanup_and_sort(result)


def refit_after(
    original: onnx.ModelProto, dropped: onnx.ModelProto, context: PassContext
) -> tuple[onnx.ModelProto, int]:
    """`dropped` with every conv that reads a changed activation refit to its output in the
    original (convs with a bias; each fed `dropped`'s own activations); how many were refit."""
    kept = {node.name for node in dropped.graph.node}
    first_change = next(i for i, node in enumerate(original.graph.node) if node.name not in kept)
    later = {node.name for node in original.graph.node[first_change:]}
    constants = graph.constant_tensors(dropped)
    sites = [
        _conv_site(node)
        for node in dropped.graph.node
        if node.op_type == "Conv" and node.name in later and len(node.input) == 3
        and node.input[1] in constants and node.input[2] in constants
    ]  # fmt: skip
    result = onnx.ModelProto()
    result.CopyFrom(dropped)
    if sites:
        refit_layers(original, result, sites, context)
    return result, len(sites)


def _conv_site(node: onnx.NodeProto) -> RefitSite:
    attrs = graph.node_attributes(node)
    kernel = len(attrs.get("kernel_shape", [1, 1]))
    geometry = {
        "strides": list(attrs.get("strides", [1] * kernel)),
        "pads": list(attrs.get("pads", [0] * 2 * kernel)),
        "dilations": list(attrs.get("dilations", [1] * kernel)),
    }
    inputs, output = node.input, node.output[0]
    return RefitSite(inputs[0], output, inputs[1], inputs[2], "conv", conv=geometry)


def measure(bench, args) -> str:
    context = PassContext(bench.input_shapes, calibration=bench.calibration, threads=args.threads)
    base = bench.score(bench.model, args.threads)["top1"]
    blocks = identity_blocks(bench.model)
    lines = [
        f"### Each block removed alone ({len(blocks)} identity blocks; top-1 "
        f"{base:.2f} for the original)",
        "",
        "| block | top-1 | Δ | refit convs | top-1 refit | Δ refit |",
        "|---|---|---|---|---|---|",
    ]
    after_refit = {}
    for block in blocks:
        dropped = without_blocks(bench.model, [block])
        refit, count = refit_after(bench.model, dropped, context)
        plain = bench.score(dropped, args.threads)["top1"]
        after_refit[block] = bench.score(refit, args.threads)["top1"]
        lines.append(
            f"| {block.add} | {plain:.2f} | {plain - base:+.2f} | {count} "
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
    print(f"`{' '.join(['python benchmarks/block_drop.py', *(argv or sys.argv[1:])])}`\n")
    print(measure(resnet20(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
