"""Writing a model with external data, at real size: reruns to the same -o, SIGTERM and
SIGKILL while writing, and what is left in the output folder after each.

    python benchmarks/external_data.py [--gigabytes 2.05] [--folder /tmp/onnxcompress-ext]

Builds `models/large.py`'s MatMul stack just over the tool's external-data threshold, written
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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.large import layers_for, write_matmul_stack  # noqa: E402

WIDTH = 4096  # one 4096 x 4096 float32 weight is 64 MiB


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
    write_matmul_stack(source, layers_for(options.gigabytes, WIDTH), WIDTH)
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
