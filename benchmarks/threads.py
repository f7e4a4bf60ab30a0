"""Latency of the same models as deployed and as `benchmark_models` times them, at intra-op
threads 1 and 2 (or `--threads`).

"alone" runs every model in turn in a fresh session, with no other session's threads alive:
pool threads spinning (onnxruntime's default, what a deployed session does) or not.
"interleaved" times all models in one `benchmark_models` loop, each `spinning` setting of
`onnxcompress.benchmark.SPINNING` (the loop's default, "stop", is meant to measure what
"alone, spinning on" measures, without its drift between models timed minutes apart).

Small models at batch 1 spend much of their time waking the thread pool once per op when
pool threads do not spin; a rewrite that adds nodes (svd, cp) pays that per node.

    python benchmarks/threads.py original.onnx svd.onnx int8.onnx --batch 1 --trials 2

A row per setting and trial; ratios are to the first model, in the same row. The last
column is the largest gap of a model's ratio from "alone, spinning on" in the same trial.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxcompress import benchmark, graph, io  # noqa: E402
from onnxcompress.calibration import random_inputs  # noqa: E402

DEPLOYED = ("alone", "on")


def median_ms(model, feeds, threads: int, spinning: bool, warmup: int, runs: int) -> float:
    run = benchmark.timing_session(model, threads, "on" if spinning else "off")
    for _ in range(warmup):
        run.run(None, feeds)
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        run.run(None, feeds)
        times.append(time.perf_counter() - begin)
    return float(np.median(times) * 1000)


def alone(models, feeds, threads: int, spinning: bool, args) -> list[float]:
    """Per model, the median over `rounds` fresh sessions of their median run time."""
    per_model = [[] for _ in models]
    for _ in range(args.rounds):
        for index, model in enumerate(models):
            per_model[index].append(
                median_ms(model, feeds, threads, spinning, args.warmup, args.runs)
            )
    return [float(np.median(values)) for values in per_model]


def interleaved(models, feeds, threads: int, spinning: str, args) -> list[float]:
    named = {str(index): model for index, model in enumerate(models)}
    timing = benchmark.benchmark_models(
        named, feeds, threads, args.warmup, args.rounds * args.runs, spinning=spinning
    )
    return [timing[name]["median_ms"] for name in named]


def measure(paths: list[Path], args) -> list[dict]:
    models = [io.load_model(path) for path in paths]
    pins = graph.resolve_input_shapes(models[0], batch_pins(models[0], args.batch))
    feeds = random_inputs(models[0], pins, count=1, seed=0)[0]
    rows = []
    for trial in range(args.trials):
        for threads in args.threads:
            for spinning in ("on", "off"):
                ms = alone(models, feeds, threads, spinning == "on", args)
                rows.append(
                    {"trial": trial, "threads": threads, "how": ("alone", spinning), "ms": ms}
                )
            for spinning in benchmark.SPINNING:
                ms = interleaved(models, feeds, threads, spinning, args)
                rows.append(
                    {"trial": trial, "threads": threads, "how": ("interleaved", spinning), "ms": ms}
                )
    return rows


def batch_pins(model, batch: int) -> dict[str, list[int]]:
    """The batch axis of every graph input pinned to `batch`, other dims as declared."""
    return {
        inp.name: [batch if i == 0 else d for i, d in enumerate(graph.dim_values(inp))]
        for inp in graph.runtime_inputs(model)
    }


def ratios(row: dict) -> list[float]:
    return [ms / row["ms"][0] for ms in row["ms"]]


def deployed_gap(row: dict, rows: list[dict]) -> float:
    """The largest |ratio - ratio alone with spinning on| over the models, same trial and
    threads."""
    (deployed,) = [
        r for r in rows
        if (r["trial"], r["threads"], r["how"]) == (row["trial"], row["threads"], DEPLOYED)
    ]  # fmt: skip
    return max(abs(a - b) for a, b in zip(ratios(row), ratios(deployed), strict=True))


def table(paths: list[Path], rows: list[dict]) -> str:
    names = [path.name for path in paths]
    lines = [
        "| trial | threads | sessions | spinning | "
        + " | ".join(names)
        + " | ratio gap to deployed |",
        "|---|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for row in rows:
        cells = [
            f"{ms:.3f} ms ({ratio:.3f})" for ms, ratio in zip(row["ms"], ratios(row), strict=True)
        ]
        sessions, spinning = row["how"]
        lines.append(
            f"| {row['trial']} | {row['threads']} | {sessions} | {spinning} | "
            + " | ".join(cells)
            + f" | {deployed_gap(row, rows):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files; ratios to the first")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts (1,2)")
    parser.add_argument("--trials", type=int, default=1, help="times every setting is measured")
    parser.add_argument("--rounds", type=int, default=5, help="fresh sessions per model alone")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per session")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t]
    print(table(args.models, measure(args.models, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
