"""The same pass run by two checkouts of onnxcompress on the same model and data, each written
model scored on the benchmark's unseen evaluation images: does a change move accuracy?

    git worktree add /tmp/before bc4121c && ln -s ../passes /tmp/before/onnxcompress/passes
    python benchmarks/experiments/compare_trees.py --model squeezenet --pass tucker2 \\
        --eval-count 500 /tmp/before .

Each checkout runs `python -m onnxcompress MODEL --passes P --data calib.npz` (256 calibration
samples, a quarter held out by the CLI) in its own folder with an empty cache folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import onnx  # noqa: E402

from benchmarks.tool_speed import _write_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="squeezenet")
    parser.add_argument("--pass", dest="pass_name", default="svd")
    parser.add_argument("--calib-count", type=int, default=256)
    parser.add_argument("--eval-count", type=int, default=500)
    parser.add_argument("trees", nargs="+", help="checkouts to run the CLI from")
    args = parser.parse_args()
    args.seed, args.quick, args.threads = 0, False, 2
    with tempfile.TemporaryDirectory() as work:
        bench, model_path, data_path = _write_inputs(args.model, args, Path(work))
        print(f"original: {bench.metric} {bench.score(bench.model, args.threads)[bench.metric]}")
        for index, tree in enumerate(args.trees):
            out = Path(work) / f"written_{index}.onnx"
            env = dict(os.environ, ONNXCOMPRESS_CACHE_DIR=tempfile.mkdtemp(dir=work))
            command = [
                sys.executable, "-m", "onnxcompress", str(model_path), "--passes",
                args.pass_name, "--data", str(data_path), "-o", str(out), "-q", "--no-bench",
            ]  # fmt: skip
            run = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
            verdict = (run.stdout.strip().splitlines() or [run.stderr.strip()])[-1]
            score = bench.score(onnx.load(str(out)), args.threads)[bench.metric]
            print(f"{tree}: exit {run.returncode}, {bench.metric} {score}; {verdict}")


if __name__ == "__main__":
    main()
