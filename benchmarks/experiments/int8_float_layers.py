"""Is a layer whose int8 kernel is slower better left in float inside the int8 model?

What `auto` does before its int8 plans: per model, the first conv (or `--layer`) is timed
alone in float and in int8 (the layer timings `auto` uses), then four whole models are
measured in one interleaved loop against the original: int8 everywhere, int8 with that layer
alone in float (`int8 keep=<layer>`), and int8 with `graph.float_region` of it in float (the
layer, the one-input ops after it and the next layers: what `auto` builds). Top-1 on each
model's evaluation images.

    python benchmarks/experiments/int8_float_layers.py --models squeezenet,resnet20 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.experiments.int8_mixed import run_pass, table  # noqa: E402
from benchmarks.image_models import add_data_arguments, resnet20, squeezenet  # noqa: E402
from onnxcompress import graph, layers  # noqa: E402
from onnxcompress.analyse import analyse  # noqa: E402
from onnxcompress.auto import layer_timing as layer_timing  # noqa: E402
from onnxcompress.benchmark import benchmark_models  # noqa: E402
from onnxcompress.factorization import Rewrite  # noqa: E402
from onnxcompress.passkit import PassContext, comma_list  # noqa: E402

MODELS = {"squeezenet": squeezenet, "resnet20": resnet20}


def quantized(model, context: PassContext, keep: list[str]):
    """The int8 pass with `keep` (node names) left in float."""
    return run_pass("int8", model, context, keep=",".join(keep))


def layer_alone(model, bench, name: str, threads: int) -> dict[str, float]:
    """The layer timed alone, float and int8, as `auto`'s tables time it."""
    analysis = analyse(model, bench.input_shapes)
    layer = next(c for c in layers.conv_layers(model, analysis)[0] if c.name == name)
    constants = graph.constant_tensors(model)

    def quantize_layer(source, feeds):
        shapes = {key: list(value.shape) for key, value in feeds.items()}
        return quantized(source, PassContext(shapes, calibration=[feeds], threads=threads), [])

    weights = [numpy_helper.from_array(constants[n], n) for n in layer.node.input[1:] if n]
    same = Rewrite([layer.node], weights)  # the layer itself: its "original" side is read
    times = {}
    for precision, quantize in (("float", None), ("int8", quantize_layer)):
        timing = layer_timing.compare_layer(constants, layer, same, threads, quantize=quantize)
        times[precision] = timing["original_ms"]
    return times


def build(model, context: PassContext, name: str) -> dict:
    """The original (named) and its three int8 models, by label."""
    region = graph.float_region(model, [name])
    return {
        "original": model,
        "int8": quantized(model, context, []),
        f"int8 keep={name}": quantized(model, context, [name]),
        f"int8, in float: {', '.join(region)}": quantized(model, context, region),
    }


def measure(bench, layer: str | None, args) -> str:
    model = layers.named_copy(bench.model)
    context = PassContext(bench.input_shapes, calibration=bench.calibration, threads=args.threads)
    name = layer or next(n.name for n in model.graph.node if n.op_type == "Conv")
    models = build(model, context, name)
    alone = layer_alone(model, bench, name, args.threads)
    scores = {label: bench.score(m, args.threads) for label, m in models.items()}
    timing = benchmark_models(
        models, bench.latency_inputs[1], threads=args.threads, repeats=args.repeats
    )
    lines = [
        f"### {bench.name}, {args.threads} thread(s)",
        "",
        f"`{name}` timed alone: float {alone['float']:.3f} ms, int8 {alone['int8']:.3f} ms "
        f"({alone['int8'] / alone['float']:.2f}x).",
        "",
        table(models, scores, timing, bench.metric, bench.metric),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="squeezenet,resnet20")
    parser.add_argument("--layer", default=None, help="node name (default: the first Conv)")
    add_data_arguments(parser, calib_count=300, eval_count=1000)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)
    print(
        f"`{' '.join(['python benchmarks/experiments/int8_float_layers.py', *(argv or sys.argv[1:])])}`\n"
    )
    for name in comma_list(args.models):
        print(measure(MODELS[name](args), args.layer, args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
