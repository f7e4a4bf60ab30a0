"""A model over protobuf's 2 GB limit through the whole pipeline, at real size: load with
external data, check, analyse, a pass with calibration data, validate, benchmark, write.

    python benchmarks/over_2gb.py [--passes svd] [--gigabytes 2.2] [--folder /tmp/onnxcompress-2gb]
        [--opt svd.target_macs=0.5] [--no-bench] [--output out.onnx|out.onnxc]

Builds `models/large.py`'s MatMul stack (4096-wide layers, seeded) once into `--folder`, with
64 rows of seeded calibration data, then runs `compress` in this process and prints each
step's start time and the memory held then and at peak so far (VmRSS, VmHWM), the pass's
seconds per rewritten layer, the fidelity and the speedup. The last line is JSON; with
`--json FILE` it is also written there. The output is loaded back by onnxruntime from its path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.large import layers_for, write_matmul_stack  # noqa: E402
from onnxcompress.cli_args import parse_pass_options  # noqa: E402
from onnxcompress.pipeline import CompressOptions, compress  # noqa: E402

HIDDEN = 4096
ROWS = 64


def memory_mb() -> tuple[int, int]:
    """(held now, peak so far) of this process, in MB."""
    status = Path("/proc/self/status").read_text()
    held, peak = (int(status.split(f"{key}:")[1].split()[0]) // 1024 for key in ("VmRSS", "VmHWM"))
    return held, peak


def prepare(folder: Path, gigabytes: float) -> tuple[Path, Path]:
    """The model and its calibration data in `folder`, built if not there yet."""
    folder.mkdir(parents=True, exist_ok=True)
    layers = layers_for(gigabytes, HIDDEN)
    model = folder / f"stack_{layers}x{HIDDEN}.onnx"
    if not model.exists():
        write_matmul_stack(model, layers, HIDDEN)
    data = folder / "calibration.npz"
    if not data.exists():
        rows = np.random.default_rng(1).standard_normal((ROWS, HIDDEN)).astype(np.float32)
        np.savez(data, x=rows)
    return model, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="svd")
    parser.add_argument("--opt", action="append", default=[], help="PASS.KEY=VALUE")
    parser.add_argument("--gigabytes", type=float, default=2.2)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/onnxcompress-2gb"))
    parser.add_argument("--output", default=None, help="default: <folder>/compressed.onnx")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    model, data = prepare(args.folder, args.gigabytes)
    output = args.output or str(args.folder / "compressed.onnx")
    started = time.perf_counter()
    steps = []

    def step(name: str) -> None:
        held, peak = memory_mb()
        steps.append({"step": name, "at_s": round(time.perf_counter() - started, 1),
                      "held_mb": held, "peak_mb": peak})  # fmt: skip
        print(f"{steps[-1]['at_s']:8.1f} s  {name:<16} held {held:>6} MB  peak {peak:>6} MB")

    options = CompressOptions(
        passes=args.passes.split(","), pass_options=parse_pass_options(args.opt, None)[1],
        output=output, data=str(data), bench=not args.no_bench, bench_repeats=10,
    )  # fmt: skip
    report = compress(model, options, on_step=step).report
    step("end")
    rewritten = sum(
        record["status"] == "rewritten" for entry in report["passes"] for record in entry["records"]
    )
    pass_seconds = sum(entry["seconds"] for entry in report["passes"])
    summary = {
        "model": str(model),
        "model_bytes": report["input_bytes"],
        "output_bytes": report["output_bytes"],
        "passes": args.passes,
        "options": args.opt,
        "macs_ratio": report["after"]["total_macs"] / report["before"]["total_macs"],
        "rewritten_layers": rewritten,
        "pass_seconds": pass_seconds,
        "pass_seconds_per_layer": pass_seconds / max(rewritten, 1),
        "worst_rel_l2": report["validation"]["worst_rel_l2"],
        "speedup": (report["benchmark"] or {}).get("speedup"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_mb": memory_mb()[1],
        "steps": steps,
    }
    _load_back(Path(report["output"]), data)
    print(json.dumps(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def _load_back(output: Path, data: Path) -> None:
    """The written model runs in onnxruntime from its path (with its data beside it)."""
    import onnxruntime as ort

    if output.suffix == ".onnxc":
        return
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    rows = np.load(data)["x"][:4]
    (value,) = session.run(None, {"x": rows})
    print(f"loaded back {output}: output {value.shape}, finite {bool(np.isfinite(value).all())}")


if __name__ == "__main__":
    sys.exit(main())
