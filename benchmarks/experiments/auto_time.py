"""Where `auto`'s first run spends its time, part by part, old way against new way:

- CP fits: tensorly's `parafac` (Khatri–Rao products) against `maths.cp_als`, on the
  model's k×k convs at two ranks; seconds and relative errors of both.
- Sensitivity: every candidate of every `--every`-th layer measured on the whole model, then
  on the part the layer reaches (`runtime.downstream_cut`); seconds of each and the largest
  relative difference between their damages.

    python benchmarks/experiments/auto_time.py --model squeezenet --samples 64 --every 2

Both ways run in this one process, alternately per layer, so machine load hits both alike,
with the candidates' factors fitted beforehand (in a fresh cache folder); the load average is
printed. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tensorly as tl  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from tensorly.decomposition import parafac  # noqa: E402

from benchmarks.run import builders  # noqa: E402
from onnxcompress import downstream  # noqa: E402
from onnxcompress.auto import sensitivity  # noqa: E402
from onnxcompress.auto.candidates import layer_choices  # noqa: E402
from onnxcompress.executor import SerialExecutor  # noqa: E402
from onnxcompress.layers import Namer, named_copy  # noqa: E402
from onnxcompress.maths import factors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="squeezenet")
    parser.add_argument("--samples", type=int, default=64, help="auto's sensitivity_samples")
    parser.add_argument("--every", type=int, default=2, help="measure every N-th layer")
    args = parser.parse_args()
    os.environ["ONNXCOMPRESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="auto-time-cache-")
    args.seed, args.quick, args.threads, args.calib_count = 0, False, 2, args.samples
    args.eval_count = 100  # the builders want it; nothing is scored here
    bench = builders()[args.model](args)
    model = named_copy(bench.model)
    print(f"load average {os.getloadavg()[0]:.2f}")
    cp_fits(model)
    sensitivity_runs(model, bench, args)
    print(f"load average {os.getloadavg()[0]:.2f}")


def cp_fits(model: onnx.ModelProto) -> None:
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    spatial = [
        node for node in model.graph.node
        if node.op_type == "Conv" and weights[node.input[1]].shape[2] > 1
    ]  # fmt: skip
    print("| conv | rank | parafac s | cp_als s | parafac error | cp_als error |")
    print("|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for node in spatial:
        w = weights[node.input[1]].astype(np.float64)
        for rank in (16, 48):
            start = time.perf_counter()
            theirs = _parafac(w, rank)
            middle = time.perf_counter()
            ours = factors.cp_factors(w, rank, seed=0, n_iter_max=100, l2_reg=0.01)
            end = time.perf_counter()
            totals[0] += middle - start
            totals[1] += end - middle
            print(
                f"| {node.name} {w.shape} | {rank} | {middle - start:.2f} | {end - middle:.2f} "
                f"| {theirs:.6f} | {ours.relative_error:.6f} |"
            )
    print(f"CP fits: parafac {totals[0]:.1f} s, cp_als {totals[1]:.1f} s\n")


def _parafac(w: np.ndarray, rank: int) -> float:
    """The relative error of tensorly's parafac as `cp_factors` called it before cp_als."""
    options = dict(
        n_iter_max=100, tol=1e-7, random_state=0, l2_reg=0.01 * float(np.sum(w * w)) / rank
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cp = parafac(tl.tensor(w), rank, init="svd", **options)
        except ValueError:
            cp = parafac(tl.tensor(w), rank, init="random", **options)
    return float(np.linalg.norm(w - tl.cp_to_tensor(cp)) / np.linalg.norm(w))


def sensitivity_runs(model: onnx.ModelProto, bench, args) -> None:
    samples = [
        {k: v[i : i + 1] for k, v in batch.items()}
        for batch in bench.calibration
        for i in range(len(next(iter(batch.values()))))
    ][: args.samples]
    shared = sensitivity.share_inputs(SerialExecutor(), model, samples)
    inits = {init.name for init in model.graph.initializer}
    shapes = {
        value.name: [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        for value in model.graph.input
        if value.name not in inits
    }
    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    factory_options = {"methods": ["svd", "cp", "tucker2", "fga"], "align": 8}
    whole_model = downstream.downstream
    seconds, worst, count = {"whole model": 0.0, "downstream part": 0.0}, 0.0, 0
    for layer in layers[:: args.every]:
        job = sensitivity.SensitivityJob(
            *shared, "onnxcompress.passes.auto:make_methods", factory_options,
            layer, shapes, args.threads, 0,
        )  # fmt: skip
        _fit_untimed(job)
        found = {}
        for how in seconds:
            downstream.downstream = whole_model if how == "downstream part" else _no_part
            sensitivity._state(job)  # loads the model, data and reference once, untimed
            start = time.perf_counter()
            found[how] = sensitivity._measure_layer(job)
            seconds[how] += time.perf_counter() - start
        for a, b in zip(found["whole model"], found["downstream part"], strict=True):
            worst = max(worst, abs(a.damage - b.damage) / max(a.damage, 1e-12))
        count += len(found["whole model"])
    downstream.downstream = whole_model
    print(
        f"sensitivity, {count} candidates of {len(layers[:: args.every])} layers, "
        f"{args.samples} samples: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
        + f"; largest relative damage difference {worst:.2g}"
    )


def _no_part(*args):
    return None


def _fit_untimed(job) -> None:
    """Build every candidate of the job's layer once, so the fit cache holds their factors
    and neither way's time includes the fits (timed apart, above)."""
    state = sensitivity._state(job)
    found, _ = layer_choices(state.model, state.methods, state.layers, only=job.layer)
    for choice in found:
        for option in choice.candidates:
            method = state.methods[option.method]
            method.build(choice.layers[option.method], option.candidate, Namer(state.model))


if __name__ == "__main__":
    main()
