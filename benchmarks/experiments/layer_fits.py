"""Per-layer view of one factorization pass on a benchmark model: which layers were rewritten
(or kept as collapsing the outputs), at which rank, the weight error the allocation saw, the
output error of the layer rewritten alone (the probe), what the calibration refit chose and
its error on held-out calibration samples, then the model's score on the evaluation data.

    python benchmarks/experiments/layer_fits.py --model minilm --pass svd --opt target_macs=0.7
    python benchmarks/experiments/layer_fits.py --model resnet20 --pass svd --opt align=8 \\
        --opt target_macs=0.5 --opt never_slower=false --calib-count 512 --eval-count 2000
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

from onnxcompress.passes import get_pass  # noqa: E402

from benchmarks.run import builders  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(builders()))
    parser.add_argument("--pass", dest="pass_name", required=True)
    parser.add_argument("--opt", action="append", default=[], help="KEY=VALUE of the pass")
    parser.add_argument("--calib-count", type=int, default=None)
    parser.add_argument("--eval-count", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.quick = False
    bench = builders()[args.model](args)
    spec = get_pass(args.pass_name)
    raw = {"never_slower": "false"}
    for item in args.opt:
        key, _, value = item.partition("=")
        raw[key] = value
    context = PassContext(bench.input_shapes, calibration=bench.calibration, threads=args.threads)
    start = time.perf_counter()
    result = spec.run(bench.model, spec.make_options(raw), context)
    seconds = time.perf_counter() - start
    print(
        "| layer | rank | weight error | alone: output rel L2 | fit | held-out error | rows "
        "| ReLU-aware: held-out relu error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for record in result.records:
        if record.status != "rewritten":
            if record.reason.startswith("kept: rewritten alone"):
                print(f"| {record.node} | kept | | | {record.reason} | | |")
            continue
        details, refit = record.details, record.details.get("refit") or {}
        held = (
            f"{refit['held_out_rel_error_before']:.3f} → {refit['held_out_rel_error_after']:.3f}"
            if "held_out_rel_error_before" in refit
            else f"{refit.get('calibration_rel_error_before', '—')} → "
            f"{refit.get('calibration_rel_error_after', '—')} (calibration)"
        )
        print(
            f"| {record.node} | {details.get('rank', details.get('ranks', '—'))} | "
            f"{details['weight_rel_error']:.3f} | {details.get('probe_output_rel_l2', '—')} | "
            f"{refit.get('fit', 'last factor')} | {held} | "
            f"{refit.get('rows', '—')} | {_relu(refit)} |"
        )
    print(f"\nsummary: macs ratio {result.summary.get('macs_ratio'):.3f}; pass {seconds:.1f} s")
    print(f"score: {bench.score(result.model, args.threads)}")


def _relu(refit: dict) -> str:
    if "relu_held_out_rel_error_before" not in refit:
        return refit.get("relu_aware", "—")
    return (
        f"{refit['relu_aware']}: {refit['relu_held_out_rel_error_before']:.3f} → "
        f"{refit['relu_held_out_rel_error_after']:.3f}"
    )


if __name__ == "__main__":
    main()
