"""Pruning passes on trained models: what each costs in accuracy and gains in MACs, bytes
(plain `.onnx`, zstd -19 of it, and the entropy-coded `.onnxc`) and latency.

    python benchmarks/experiments/pruning.py                                  # resnet20 + mnist, defaults
    python benchmarks/experiments/pruning.py --models resnet20 \
        --variants 'prune:sparsity=0.8;quantize_bits=6,rdprune:sparsity=0.8,channels:ratio=0.3'

A variant is `pass:key=value;key=value`. Each runs through `run_passes` on calibration images
from the training split (passes that fit on data — `channels` refit, `rdprune`'s comparison —
use them), then: MACs (`analyse`), nonzero weights, plain `.onnx` bytes, zstd -19 of that
file, `.onnxc` bytes (the coded weights a pass handed over, else the generic sparse coder),
latency of the original and every variant timed together (`onnxcompress.benchmark`: batch 1,
interleaved repeats, medians), and top-1 accuracy / agreement / relative L2 of the logits on
a seeded subset of the test split. Every figure printed comes from this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.factorization import DATASETS, predict  # noqa: E402
from onnxcompress import CompressError, graph  # noqa: E402
from onnxcompress.analyse import analyse  # noqa: E402
from onnxcompress.benchmark import benchmark_models  # noqa: E402
from onnxcompress.coding import onnxc_writer as onnxc_writer  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402
from onnxcompress.pipeline import run_passes  # noqa: E402

DEFAULT_VARIANTS = (
    "prune:sparsity=0.3,prune:sparsity=0.3;quantize_bits=6,prune:sparsity=0.5,"
    "prune:sparsity=0.5;quantize_bits=6,prune:sparsity=0.5;quantize_bits=4,"
    "rdprune:sparsity=0.3,rdprune:sparsity=0.5,rdprune:sparsity=0.8,"
    "channels:ratio=0.3,channels:target_macs=0.5;allocation=greedy;round_to=4,"
    "channels:target_macs=0.7;round_to=4"
)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    options = dict(item.split("=", 1) for item in rest.split(";") if item)
    return name.strip(), options


def nonzero_weights(model: onnx.ModelProto) -> tuple[int, int]:
    """(nonzero, total) elements of the float initializers with at least 64 elements."""
    nonzero = total = 0
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype.kind == "f" and value.size >= 64:
            nonzero += int(np.count_nonzero(value))
            total += value.size
    return nonzero, total


def measure(model, coded, data, reference, threads) -> dict:
    shapes = graph.resolve_input_shapes(data.model)
    outputs = predict(model, data.evaluation, threads)
    plain = model.SerializeToString()
    nonzero, total = nonzero_weights(model)
    return {
        "macs": analyse(model, shapes).total_macs,
        "nonzero": nonzero,
        "weights": total,
        "onnx_bytes": len(plain),
        "zstd_bytes": onnxc_writer.reference_sizes(plain)["zstd19"],
        "onnxc_bytes": len(onnxc_writer.encode_model(model, coded)),
        "accuracy": float(np.mean(outputs.argmax(1) == data.labels)),
        "agreement": float(np.mean(outputs.argmax(1) == reference.argmax(1))),
        "rel_l2": float(np.linalg.norm(outputs - reference) / np.linalg.norm(reference)),
    }


def run_model(name: str, args) -> None:
    from onnxcompress import passes

    data = DATASETS[name](args)
    shapes = graph.resolve_input_shapes(data.model)
    context = PassContext(shapes, calibration=data.calibration, seed=args.seed, threads=2)
    reference = predict(data.model, data.evaluation, args.threads)
    rows = {"original": measure(data.model, [], data, reference, args.threads)}
    models = {"original": data.model}
    seconds = {}
    for text in args.variants:
        pass_name, raw = parse_variant(text)
        coded: list = []
        started = time.perf_counter()
        try:
            spec = passes.get_pass(pass_name)
            model, _ = run_passes(
                data.model, [spec], {pass_name: spec.make_options(raw)}, context,
                lambda _step: None, coded=coded,
            )  # fmt: skip
            graph.check_model(model)
        except CompressError as exc:
            print(f"- {name} {text}: error: {exc}")
            continue
        seconds[text] = time.perf_counter() - started
        rows[text] = measure(model, coded, data, reference, args.threads)
        models[text] = model
    one_sample = {key: value[:1] for key, value in data.evaluation[0].items()}
    latency = benchmark_models(models, one_sample, threads=args.threads, repeats=args.repeats)
    print_table(name, data, rows, latency, seconds)


def print_table(name, data, rows, latency, seconds) -> None:
    base = rows["original"]
    print(f"\n### {name}\n\n- calibration: {data.calibration_note}; evaluation: "
          f"{data.evaluation_note}\n")  # fmt: skip
    print(
        "| variant | MACs | nonzero weights | .onnx | zstd -19 | .onnxc | .onnxc vs .onnx "
        "| latency ms (× orig) | top-1 | drop (pts) | agreement | rel L2 | pass s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        ms = latency[label]["median_ms"]
        speed = latency["original"]["median_ms"] / ms
        print(
            f"| {label} | {r['macs'] / base['macs']:.3f} | {r['nonzero'] / r['weights']:.3f} "
            f"| {r['onnx_bytes'] / 1e3:.1f} kB | {r['zstd_bytes'] / 1e3:.1f} kB "
            f"| {r['onnxc_bytes'] / 1e3:.1f} kB | {base['onnx_bytes'] / r['onnxc_bytes']:.1f}× "
            f"| {ms:.3f} ({speed:.2f}×) | {100 * r['accuracy']:.2f} % "
            f"| {100 * (base['accuracy'] - r['accuracy']):+.2f} | {100 * r['agreement']:.1f} % "
            f"| {r['rel_l2']:.3f} | {seconds.get(label, 0):.0f} |",
            flush=True,
        )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,mnist", help="resnet20,mnist,squeezenet")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="pass:key=value;… ,…")
    parser.add_argument("--eval-count", type=int, default=2000, help="evaluation images")
    parser.add_argument("--calib-count", type=int, default=512, help="calibration images")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/experiments/pruning.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    print(
        f"`{command.strip()}` — {platform.machine()}, {os.cpu_count()} cores (load average "
        f"{os.getloadavg()[0]:.1f}), onnxruntime {ort.__version__} CPU, {args.threads} threads, "
        f"batch 1, {args.repeats} interleaved timed runs, seed {args.seed}"
    )
    started = time.perf_counter()
    for name in args.models:
        run_model(name, args)
    print(f"\nTotal {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
