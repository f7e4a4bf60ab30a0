"""How long `auto` takes on a monodepth2-style depth decoder (models/exports.py, about 465 M
MACs at 192×640), as a user runs it: a fresh process, empty caches, calibration data.

    python benchmarks/experiments/depth_decoder_auto.py --out /tmp/depth --samples 96
    python benchmarks/experiments/depth_decoder_auto.py --out /tmp/depth --tree <other checkout>

Writes the decoder and `--samples` seeded rectified-normal encoder features into `--out`, runs
`python -m onnxcompress decoder.onnx --passes auto --opt auto.target_macs=0.5 --data ...`
(with `--tree`, that checkout's code) in an empty `ONNXCOMPRESS_CACHE_DIR`, and prints the
wall time, the sensitivity samples, the MACs ratio and the held-out relative L2. Random
weights: the figures are about time, not about what a trained decoder would lose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from models.exports import DEPTH_SKIPS, depth_decoder  # noqa: E402


def write_inputs(out: Path, samples: int, height: int, width: int) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    model, data = out / "decoder.onnx", out / f"features_{samples}.npz"
    onnx.save(depth_decoder(height=height, width=width), model)
    if not data.exists():
        rng = np.random.default_rng(0)
        shapes = [(c, height // down, width // down) for c, down in DEPTH_SKIPS]
        arrays = {
            f"features.{i}": np.maximum(rng.standard_normal((samples, *shape)), 0).astype(
                np.float32
            )
            for i, shape in enumerate(shapes)
        }
        np.savez(data, **arrays)
    return model, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for model, data, report")
    parser.add_argument("--samples", type=int, default=96, help="calibration samples")
    parser.add_argument("--size", default="192x640", help="input height x width")
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose code runs")
    parser.add_argument("--opt", action="append", default=[], help="more --opt for the CLI")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    model, data = write_inputs(args.out, args.samples, height, width)
    report = args.out / f"report_{args.tree.name}.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(args.tree),
        "ONNXCOMPRESS_CACHE_DIR": tempfile.mkdtemp(prefix="depth-auto-cache-"),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "onnxcompress", str(model), "--passes", "auto",
        "--opt", "auto.target_macs=0.5", *[f"--opt={o}" for o in args.opt],
        "--data", str(data), "-q", "-o", str(args.out / f"auto_{args.tree.name}.onnx"),
        "--report", str(report),
    ]  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f}; {' '.join(command)}")
    started = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=args.tree)
    seconds = time.perf_counter() - started
    print(f"exit {run.returncode}, {seconds:.1f} s wall, load average {os.getloadavg()[0]:.2f}")
    if run.returncode != 0:
        print(run.stderr)
        return
    found = json.loads(report.read_text())
    auto = found["passes"][0]["summary"]["auto"]
    print(f"sensitivity: {json.dumps(auto['sensitivity'])}")
    print(f"pass seconds {found['passes'][0]['seconds']}")
    print(f"MACs ratio {found['after']['total_macs'] / found['before']['total_macs']:.3f}")
    print(f"held-out worst relative L2 {found['validation']['worst_rel_l2']:.4f}")


if __name__ == "__main__":
    main()
