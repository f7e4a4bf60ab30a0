"""How much one model's latency ratio to another moves between timing windows: the noise
`auto`'s latency checks live with, and why they take the median of several short windows.

    python -m onnxcompress ../shared/models/resnet20_cifar10.onnx --passes cp \\
        --opt cp.target_macs=0.25 --opt cp.align=8 --no-bench -q -o /tmp/cp25.onnx
    python benchmarks/experiments/timing_noise.py ../shared/models/resnet20_cifar10.onnx /tmp/cp25.onnx \\
        --threads 2 --windows 12 --seconds 0.5,1,3

Each window is one `benchmark_models` call (fresh sessions, the two models interleaved, the
same routine auto uses) of at least the given seconds; the ratio is the second model's median
over the first's. Per window length: every window's ratio, their median, standard deviation
and range, and the standard deviation of the median of three windows (auto's check) over
consecutive triples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.threads import batch_pins  # noqa: E402
from onnxcompress import graph, io  # noqa: E402
from onnxcompress.benchmark import benchmark_models  # noqa: E402
from onnxcompress.calibration import random_inputs  # noqa: E402


def window_ratios(original, compressed, feeds, threads: int, windows: int, seconds: float):
    """The compressed model's latency over the original's, one ratio per timing window."""
    ratios = []
    for _ in range(windows):
        timing = benchmark_models(
            {"original": original, "compressed": compressed},
            feeds,
            threads=threads,
            repeats=20,
            min_seconds=seconds,
        )
        ratios.append(timing["compressed"]["median_ms"] / timing["original"]["median_ms"])
    return ratios


def summary(seconds: float, ratios: list[float]) -> dict:
    values = np.asarray(ratios)
    triples = [np.median(values[i : i + 3]) for i in range(0, len(values) - 2, 3)]
    return {
        "seconds": seconds,
        "ratios": [round(float(r), 3) for r in values],
        "median": float(np.median(values)),
        "std": float(values.std()),
        "range": (float(values.min()), float(values.max())),
        "std_of_median_of_3": float(np.std(triples)) if len(triples) > 1 else None,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| window s | median | std | range | std, median of 3 | ratios |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["range"]
        of3 = row["std_of_median_of_3"]
        lines.append(
            f"| {row['seconds']:g} | {row['median']:.3f} | {row['std']:.3f} | "
            f"{low:.3f}–{high:.3f} | {'' if of3 is None else f'{of3:.3f}'} | "
            f"{', '.join(f'{r:.3f}' for r in row['ratios'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("compressed", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--windows", type=int, default=12, help="windows per length (12)")
    parser.add_argument("--seconds", default="0.5,1,3", help="window lengths (0.5,1,3)")
    args = parser.parse_args(argv)
    original, compressed = io.load_model(args.original), io.load_model(args.compressed)
    pins = graph.resolve_input_shapes(original, batch_pins(original, args.batch))
    feeds = random_inputs(original, pins, count=1, seed=0)[0]
    rows = []
    for seconds in (float(s) for s in args.seconds.split(",") if s):
        ratios = window_ratios(original, compressed, feeds, args.threads, args.windows, seconds)
        rows.append(summary(seconds, ratios))
    print(f"{args.compressed.name} over {args.original.name}, {args.threads} threads")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
