"""How much the caches speed up a second `auto` run: the same command twice, each in a fresh
process, against one fresh cache folder (layer latencies and sensitivity results), wall time
of each and their ratio.

    python benchmarks/auto_cache.py                              # ResNet-20, 512 CIFAR-10 images
    python benchmarks/auto_cache.py --target 0.6 --jobs 2

The data are CIFAR-10 training images (seeded), written to an .npz the CLI reads with --data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_MEAN = np.array([125.3, 123.0, 113.9], np.float32)
CIFAR_STD = np.array([63.0, 62.1, 66.7], np.float32)


def cifar_npz(path: Path, count: int, seed: int) -> None:
    sys.path.insert(0, str(SHARED / "data"))
    import load  # ../shared/data/load.py

    (x, y), _ = load.cifar10()
    pick = np.sort(np.random.default_rng(seed).choice(len(x), count, replace=False))
    images = ((x[pick].astype(np.float32) - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2)
    np.savez(path, input=np.ascontiguousarray(images), labels=y[pick])


def run_once(args, folder: Path, data: Path, cache: Path, name: str) -> tuple[float, dict]:
    command = [
        sys.executable, "-m", "onnxcompress", str(SHARED / "models" / "resnet20_cifar10.onnx"),
        "--passes", "auto", "--opt", f"auto.target_latency={args.target}", "--data", str(data),
        "--jobs", str(args.jobs), "-o", str(folder / f"{name}.onnx"),
        "--report", str(folder / f"{name}.json"), "-q", "--no-bench",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env=_env(cache), cwd=REPO, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run {name} failed: {done.stderr.strip()}")
    return seconds, json.loads((folder / f"{name}.json").read_text())


def _env(cache: Path) -> dict:
    import os

    return {**os.environ, "ONNXCOMPRESS_CACHE_DIR": str(cache)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.6, help="auto.target_latency")
    parser.add_argument("--count", type=int, default=512, help="calibration images")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data, cache = folder / "cifar.npz", folder / "cache"
        cifar_npz(data, args.count, args.seed)
        first, report = run_once(args, folder, data, cache, "first")
        second, again = run_once(args, folder, data, cache, "second")
    layers = [
        [row["method"] for row in r["passes"][0]["summary"]["auto"]["layers"]]
        for r in (report, again)
    ]
    print(f"first run {first:.1f} s, second run {second:.1f} s: {first / second:.1f}× faster")
    print(f"same plan both times: {layers[0] == layers[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
