"""How much the caches speed up a second `auto` run: the same command twice, each in a fresh
process, against one fresh cache folder (layer latencies and sensitivity results), wall time
of each and their ratio.

    python benchmarks/experiments/auto_cache.py                              # ResNet-20, 512 CIFAR-10 images
    python benchmarks/experiments/auto_cache.py --target 0.6 --jobs 2
    python benchmarks/experiments/auto_cache.py --model squeezenet_fp16 --target 0.5 --count 128 --threads 1

ResNet-20's data are CIFAR-10 training images (seeded), written to an .npz the CLI reads with
--data; SqueezeNet's float16 file as shipped reads the first `--count` ImageNet validation
images with the README's --images/--preprocess/--labels.
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

REPO = Path(__file__).resolve().parents[2]
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


def model_arguments(args, data: Path) -> list[str]:
    """The model file and its data options."""
    if args.model == "resnet20":
        return [str(SHARED / "models" / "resnet20_cifar10.onnx"), "--data", str(data)]
    imagenet = SHARED / "data" / "imagenet_val_1300"
    return [
        str(SHARED / "models" / "squeezenet1.0_fp16.onnx"), "--images", str(imagenet / "data"),
        "--preprocess", "resize=224,mean=104;117;123,bgr", "--labels",
        str(imagenet / "dataset.txt"), "--calib-count", str(args.count),
    ]  # fmt: skip


def run_once(args, folder: Path, data: Path, cache: Path, name: str) -> tuple[float, dict]:
    command = [
        sys.executable, "-m", "onnxcompress", *model_arguments(args, data),
        "--passes", "auto", "--opt", f"auto.target_latency={args.target}",
        "--jobs", str(args.jobs), "--threads", str(args.threads),
        "-o", str(folder / f"{name}.onnx"),
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
    parser.add_argument("--model", choices=("resnet20", "squeezenet_fp16"), default="resnet20")
    parser.add_argument("--target", type=float, default=0.6, help="auto.target_latency")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--count", type=int, default=512, help="calibration images")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data, cache = folder / "cifar.npz", folder / "cache"
        if args.model == "resnet20":
            cifar_npz(data, args.count, args.seed)
        first, report = run_once(args, folder, data, cache, "first")
        second, again = run_once(args, folder, data, cache, "second")
    layers = [
        [row["method"] for row in r["passes"][0]["summary"]["auto"]["layers"]]
        for r in (report, again)
    ]
    print(f"`python benchmarks/experiments/auto_cache.py {' '.join(sys.argv[1:])}`")
    print(f"first run {first:.1f} s, second run {second:.1f} s: {first / second:.1f}× faster")
    print(f"same plan both times: {layers[0] == layers[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
