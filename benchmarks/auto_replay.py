"""`auto` on a real model with scripted timings, so that two commits can be compared exactly:
a refactor of the search that changes nothing must write the same file at both.

    python benchmarks/auto_replay.py --models resnet20,squeezenet --out /tmp/replay_after.json

Every timing is replaced by a deterministic stand-in (a layer or model costs its weight count,
int8 models SCRIPTED_INT8 of that), so the search's decisions depend only on its code and the
measured output errors. Written: each model's `auto` summary (rounds, chosen plan, layers) and
a digest of the model it kept. Real timings are what `run.py` measures; this is not that."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # as benchmarks/run.py: BLAS threads stall

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import run  # noqa: E402
from onnxcompress import benchmark  # noqa: E402
from onnxcompress.auto import layer_timing  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402
from onnxcompress.registry import get_pass  # noqa: E402

SCRIPTED_INT8 = 0.6


def _weights(model) -> float:
    count = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    quantized = any(node.op_type == "DequantizeLinear" for node in model.graph.node)
    return float(count) * (SCRIPTED_INT8 if quantized else 1.0)


def script_timings() -> None:
    """Every timer the search uses, replaced by weight counts."""

    def compare_layer(constants, layer, rewrite, threads=2, cache=None, quantize=None):
        factor = 1.0 if quantize is None else SCRIPTED_INT8
        before = factor * float(layer.weight.size)
        after = factor * float(sum(int(np.prod(i.dims)) for i in rewrite.initializers))
        return {"original_ms": before, "rewritten_ms": after, "speedup": before / after}

    def benchmark_models(models, *args, **kwargs):
        return {name: {"median_ms": _weights(model)} for name, model in models.items()}

    layer_timing.compare_layer = compare_layer
    layer_timing.call_overhead_ms = lambda *args, **kwargs: 0.0
    benchmark.benchmark_models = benchmark_models


def replay(name: str, calib_count: int, seed: int) -> dict:
    args = run.parse_args(
        ["--models", name, "--calib-count", str(calib_count), "--eval-count", "8"]
    )
    bench = run.builders()[name](args)
    spec = get_pass("auto")
    context = PassContext(bench.input_shapes, calibration=bench.calibration, seed=seed, threads=2)
    options = spec.make_options({"target_latency": 0.5, "jobs": 1})
    result = spec.run(bench.model, options, context)
    digest = hashlib.sha256(result.model.SerializeToString(deterministic=True)).hexdigest()
    return {"summary": result.summary["auto"], "model_sha256": digest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,squeezenet")
    parser.add_argument("--calib-count", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    script_timings()
    found = {m: replay(m, args.calib_count, args.seed) for m in args.models.split(",") if m}
    args.out.write_text(json.dumps(found, indent=1, sort_keys=True, default=str) + "\n")
    for name, entry in found.items():
        chosen = entry["summary"]["model"]
        print(f"{name}: {len(entry['summary']['rounds'])} rounds, kept {chosen}, "
              f"model {entry['model_sha256'][:16]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
