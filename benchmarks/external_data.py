"""Writing a model with external data, at real size: reruns to the same -o, SIGTERM and
SIGKILL while writing, and what is left in the output folder after each.

    python benchmarks/external_data.py [--gigabytes 2.05] [--folder /tmp/onnxcompress-ext]

Builds a MatMul stack of seeded weights just over the tool's external-data threshold, saved
with external data, then runs `python -m onnxcompress IN --passes identity -o OUT`: twice, once
stopped by SIGTERM and once by SIGKILL as soon as its temp file appears (while it writes), and
once more after that. Prints one line per run: exit code, seconds, and every file in the
output folder with its size; last, the peak memory of the largest run.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
WIDTH = 4096  # one 4096 x 4096 float32 weight is 64 MiB


def matmul_stack(total_bytes: float, seed: int = 0) -> onnx.ModelProto:
    """x [1, WIDTH] through as many MatMuls as `total_bytes` of weights hold."""
    rng = np.random.default_rng(seed)
    layers = max(1, int(total_bytes // (WIDTH * WIDTH * 4)) + 1)
    nodes, weights, name = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) / np.float32(WIDTH**0.5)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [name, f"w{i}"], [out], name=f"mm{i}"))
        name = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])
    graph = helper.make_graph(nodes, "stack", [x], [y], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def listing(folder: Path) -> str:
    entries = sorted(folder.iterdir())
    return ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in entries)


def run(args: list[str], stop: signal.Signals | None = None) -> tuple[int, float]:
    """Run the CLI; with `stop`, send that signal once a temp file of the output appears."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "onnxcompress", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    output = Path(args[args.index("-o") + 1])
    while stop is not None and process.poll() is None:
        if any(output.parent.glob(f".{output.name}.onnxcompress-*")):
            time.sleep(0.5)  # well inside the write of a 2 GB file
            process.send_signal(stop)
            break
        time.sleep(0.05)
    process.wait()
    return process.returncode, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.05)
    parser.add_argument("--folder", default="/tmp/onnxcompress-external-data")
    options = parser.parse_args()
    folder = Path(options.folder)
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "in").mkdir(parents=True)
    (folder / "out").mkdir()
    source = folder / "in" / "stack.onnx"
    onnx.save_model(
        matmul_stack(options.gigabytes * 1e9),
        source,
        save_as_external_data=True,
        location="stack.onnx.data",
    )
    print(f"# External data at {options.gigabytes:g} GB\n")
    print(f"command: `python benchmarks/external_data.py --gigabytes {options.gigabytes:g}`\n")
    print(f"- input: {listing(folder / 'in')}")
    command = [str(source), "--passes", "identity", "-o", str(folder / "out" / "stack.onnx")]
    command += ["--no-bench", "-q"]
    runs = [("run", None), ("rerun", None), ("SIGTERM while writing", signal.SIGTERM)]
    runs += [("SIGKILL while writing", signal.SIGKILL), ("run after the kill", None)]
    for label, stop in runs:
        code, seconds = run(command, stop)
        print(
            f"- {label}: exit {code}, {seconds:.0f} s; out: {listing(folder / 'out')}", flush=True
        )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print(f"- peak memory of the largest run: {peak:.1f} GB")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
