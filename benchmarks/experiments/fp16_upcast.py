"""What a float16 file gains from `upcast` on onnxruntime's CPU provider.

SqueezeNet 1.0 as shipped (`../shared/models/squeezenet1.0_fp16.onnx`, float16 weights and
input) against: its upcast (`upcast`, float16 input and output kept), int8 of the file as
given (`int8`), int8 of the upcast (`upcast,int8`), and the latter with the first conv's float
region in float (what `auto` builds for SqueezeNet). All models take the same float16 input
and are timed in one interleaved loop; top-1 on the ImageNet validation images not used for
calibration.

    python benchmarks/experiments/fp16_upcast.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.experiments.int8_mixed import run_pass  # noqa: E402
from benchmarks.image_models import SHARED_MODELS, _factorization, add_data_arguments  # noqa: E402
from onnxcompress import graph, io, layers  # noqa: E402
from onnxcompress.benchmark import benchmark_models  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402

FILE = "squeezenet1.0_fp16.onnx"


def half(batches: list[dict]) -> list[dict]:
    return [{name: value.astype(np.float16) for name, value in b.items()} for b in batches]


def build(model, context: PassContext) -> dict:
    """The float16 original and the models compared with it, by label."""
    upcast = run_pass("upcast", model, context)
    first = next(n.name for n in upcast.graph.node if n.op_type == "Conv")
    region = graph.float_region(upcast, [first])
    return {
        "float16 (as shipped)": model,
        "upcast": upcast,
        "int8": run_pass("int8", model, context, upcast=False),  # the file as given
        "upcast,int8": run_pass("int8", upcast, context),
        f"upcast,int8, in float: {', '.join(region)}": run_pass(
            "int8", upcast, context, keep=",".join(region)
        ),
    }


def table(models: dict, top1: dict, timing: dict) -> str:
    base = next(iter(models))
    base_ms = timing[base]["median_ms"]
    lines = ["| model | latency b1 | ms | top-1 | Δ |", "|---|---|---|---|---|"]
    for label in models:
        ms = timing[label]["median_ms"]
        delta = top1[label] - top1[base]
        lines.append(
            f"| {label} | {ms / base_ms:.3f} | {ms:.2f} | {top1[label]:.2f} | {delta:+.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, calib_count=300, eval_count=1000)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)
    factorization = _factorization()
    data = factorization.squeezenet_data(args)  # the images; its model is upcast in code
    model = layers.named_copy(io.load_model(SHARED_MODELS / FILE))
    calibration, evaluation = half(data.calibration), half(data.evaluation)
    shapes = graph.resolve_input_shapes(model)
    context = PassContext(shapes, calibration=calibration, threads=args.threads)
    models = build(model, context)
    top1 = {
        label: 100 * float(np.mean(factorization.predict(m, evaluation, args.threads).argmax(1)
                                   == data.labels))
        for label, m in models.items()
    }  # fmt: skip
    timing = benchmark_models(models, evaluation[0], threads=args.threads, repeats=args.repeats)
    command = " ".join(["python benchmarks/experiments/fp16_upcast.py", *(argv or sys.argv[1:])])
    print(f"`{command}`\n\n{FILE}, {args.threads} thread(s), top-1 on {data.evaluation_note}\n")
    print(table(models, top1, timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
