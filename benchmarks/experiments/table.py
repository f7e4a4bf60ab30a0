"""Run passes over fixture and real models and print a Markdown results table.

    python benchmarks/experiments/table.py --passes fold_bn            # all fixtures + ../shared/models
    python benchmarks/experiments/table.py --passes identity --models models/mlp.onnx

Every figure comes from `onnxcompress.compress` in this run: MACs and parameters from
`analyse`, bytes from the written files, latency as medians of interleaved onnxruntime runs
(before and after in the same process), fidelity on seeded random inputs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from onnxcompress import CompressError, CompressOptions, compress  # noqa: E402
from onnxcompress.report.tables import human  # noqa: E402

SHARED_MODELS = REPO.parent / "shared" / "models"
PINS = {"ppocr_mobile_v2.0_cls.onnx": {"x": [1, 3, 48, 192]}}
# Models random inputs cannot drive (silero's int64 sample rate) or too slow for a table run.
SKIP = {"silero_vad_16k_op15.onnx": "needs a real `sr` input (see tests/test_shared_models.py)"}


def default_models() -> list[Path]:
    models = sorted((REPO / "models").glob("*.onnx"))
    if SHARED_MODELS.exists():
        models += sorted(p for p in SHARED_MODELS.glob("*.onnx") if p.name not in SKIP)
    return models


def row(path: Path, passes: list[str], repeats: int, threads: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        options = CompressOptions(
            passes=passes,
            output=os.path.join(tmp, "out.onnx"),
            input_shapes=PINS.get(path.name, {}),
            bench_repeats=repeats,
            threads=threads,
            calibration_count=1 if path.name == "fns_candy.onnx" else None,
        )
        report = compress(path, options).report
    before, after, bench = report["before"], report["after"], report["benchmark"]
    worst = max(report["validation"]["outputs"].values(), key=lambda s: s["rel_l2"])
    return (
        f"| {path.name} | {human(before['total_macs'])} → {human(after['total_macs'])} "
        f"| {human(before['total_params'])} → {human(after['total_params'])} "
        f"| {human(report['input_bytes'])} → {human(report['output_bytes'])} "
        f"| {bench['original']['median_ms']:.3f} → {bench['result']['median_ms']:.3f} "
        f"| {bench['speedup']:.2f}× | {worst['rel_l2']:.2e} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", required=True, help="comma-separated passes")
    parser.add_argument("--models", nargs="*", type=Path, help="default: fixtures + shared")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    passes = [p for p in args.passes.split(",") if p]
    print(
        f"`python benchmarks/experiments/table.py --passes {args.passes}` — {platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} onnxruntime threads, batch 1, "
        f"median of {args.repeats} interleaved runs\n"
    )
    print("| model | MACs | params | file bytes | latency ms | speedup | worst rel L2 |")
    print("|---|---|---|---|---|---|---|")
    for path in args.models or default_models():
        try:
            print(row(path, passes, args.repeats, args.threads), flush=True)
        except CompressError as exc:
            print(f"| {path.name} | error: {exc} | | | | | |", flush=True)
    for name, why in SKIP.items():
        print(f"\nnot run: {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
