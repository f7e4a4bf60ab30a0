"""The graph-order refit read two ways: streamed (each model run forward once, segment by
segment: `onnxcompress.refit_stream`) against each layer's tensors cut from the inputs
(`runtime.paired_outputs`, as before). Runs a pass both ways, alternately, on a benchmark
model with its calibration data, and prints each way's pass seconds and how far the two
written models are apart (relative L2 of their outputs on the calibration data).

    python benchmarks/experiments/refit_stream.py --model squeezenet --pass svd --repeats 2

Not a pass/fail test; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from onnxcompress.passes import get_pass  # noqa: E402

from benchmarks.run import builders  # noqa: E402
from onnxcompress import layer_refit  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402
from onnxcompress.runtime import run_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="squeezenet")
    parser.add_argument("--pass", dest="pass_name", default="svd")
    parser.add_argument("--opt", action="append", default=[], help="pass option KEY=VALUE")
    parser.add_argument("--calib-count", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.seed, args.quick, args.threads, args.eval_count = 0, False, 2, 100
    bench = builders()[args.model](args)
    spec = get_pass(args.pass_name)
    options = spec.make_options(dict(item.split("=", 1) for item in args.opt))
    context = PassContext(bench.input_shapes, bench.calibration, seed=0, threads=args.threads)
    streamed = layer_refit.RefitStream
    seconds = {"streamed": [], "cut per layer": []}
    models = {}
    print(f"load average {os.getloadavg()[0]:.2f}")
    for _ in range(args.repeats):
        for how in seconds:
            layer_refit.RefitStream = streamed if how == "streamed" else _refuse
            start = time.perf_counter()
            models[how] = spec.run(bench.model, options, context).model
            seconds[how].append(time.perf_counter() - start)
    layer_refit.RefitStream = streamed
    a, b = (run_model(models[how], bench.calibration, args.threads) for how in seconds)
    apart = max(
        float(np.linalg.norm(a[name] - b[name]) / max(np.linalg.norm(b[name]), 1e-30)) for name in b
    )
    for how, values in seconds.items():
        print(f"{how}: pass s {', '.join(f'{v:.1f}' for v in values)}")
    print(f"outputs apart (relative L2, streamed vs cut): {apart:.2g}")
    print(f"load average {os.getloadavg()[0]:.2f}")


def _refuse(*args, **kwargs):
    raise ValueError("streaming off for this comparison")


if __name__ == "__main__":
    main()
