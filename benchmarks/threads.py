"""Latency of the same models under onnxruntime's thread settings: intra-op threads 1 and 2
(or `--threads`), thread-pool spinning on (onnxruntime's default) and off (what
`benchmark_models` uses, so that interleaved sessions do not steal each other's cores).

Small models at batch 1 spend much of their time waking the thread pool once per op; a
rewrite that adds nodes (svd, cp) pays that per node, so speedups depend on the setting.

    python benchmarks/threads.py original.onnx svd.onnx int8.onnx --batch 1

Each setting runs every model in turn, one fresh session at a time (no other session's
threads alive), `--rounds` times; a model's figure is the median over rounds of its median
run time. Ratios are to the first model, in the same setting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxcompress import graph, io  # noqa: E402
from onnxcompress.calibration import random_inputs  # noqa: E402
from onnxcompress.validate import make_session, session_options  # noqa: E402


def session(model, threads: int, spinning: bool):
    options = session_options(threads, optimize=True)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return make_session(model, options=options)


def median_ms(model, feeds, threads: int, spinning: bool, warmup: int, runs: int) -> float:
    run = session(model, threads, spinning)
    for _ in range(warmup):
        run.run(None, feeds)
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        run.run(None, feeds)
        times.append(time.perf_counter() - begin)
    return float(np.median(times) * 1000)


def measure(paths: list[Path], args) -> list[dict]:
    models = [io.load_model(path) for path in paths]
    pins = graph.resolve_input_shapes(models[0], batch_pins(models[0], args.batch))
    feeds = random_inputs(models[0], pins, count=1, seed=0)[0]
    rows = []
    for threads in args.threads:
        for spinning in (True, False):
            per_model = [[] for _ in models]
            for _ in range(args.rounds):
                for index, model in enumerate(models):
                    per_model[index].append(
                        median_ms(model, feeds, threads, spinning, args.warmup, args.runs)
                    )
            medians = [float(np.median(values)) for values in per_model]
            rows.append({"threads": threads, "spinning": spinning, "ms": medians})
    return rows


def batch_pins(model, batch: int) -> dict[str, list[int]]:
    """The batch axis of every graph input pinned to `batch`, other dims as declared."""
    return {
        inp.name: [batch if i == 0 else d for i, d in enumerate(graph.dim_values(inp))]
        for inp in graph.runtime_inputs(model)
    }


def table(paths: list[Path], rows: list[dict]) -> str:
    names = [path.name for path in paths]
    lines = [
        "| threads | spinning | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for row in rows:
        base = row["ms"][0]
        cells = [f"{ms:.3f} ms ({ms / base:.2f})" for ms in row["ms"]]
        spin = "on" if row["spinning"] else "off"
        lines.append(f"| {row['threads']} | {spin} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files; ratios to the first")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts (1,2)")
    parser.add_argument("--rounds", type=int, default=5, help="fresh sessions per model")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per session")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t]
    print(table(args.models, measure(args.models, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
