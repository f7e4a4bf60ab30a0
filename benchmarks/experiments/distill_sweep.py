"""Where `distill`'s defaults come from: ResNet-20 compressed once by a pass (refit on
`--calib-count` CIFAR-10 training images), then distilled under one setting per run on
`--train-count` other training images (optionally with their labels), scored on
`--eval-count` test images (all 10,000 by default: at 2,000 one image is 0.05 points and
two models that disagree on ~7 % of images differ by ±0.5 points by chance).

    python benchmarks/experiments/distill_sweep.py --method fga --budget 0.5 \
        --train-count 20000 --opt distill.steps=1000 --opt distill.lr=1e-3 --label lr1e-3

Each run appends one JSON line (setting, top-1, training seconds, load average) to
`--out` (benchmarks/results/distill_sweep/runs.jsonl); the compressed model is cached in
`--cache` so that every setting starts from the same weights. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnxcompress.passes import get_pass  # noqa: E402

from benchmarks import factorization  # noqa: E402
from onnxcompress import io  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402
from onnxcompress.pipeline import run_passes  # noqa: E402
from onnxcompress.runtime import run_model  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "distill_sweep"


def cifar_splits(args):
    """(calibration, training, training labels, evaluation, evaluation labels): calibration
    and training are disjoint seeded subsets of the 50,000 training images."""
    load = factorization._load_module()
    (x_train, y_train), (x_test, y_test) = load.cifar10()

    def prepare(x: np.ndarray) -> np.ndarray:
        x = (x.astype(np.float32) - factorization.CIFAR_MEAN) / factorization.CIFAR_STD
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    order = np.random.default_rng(args.seed).permutation(len(x_train))
    calib = np.sort(order[: args.calib_count])
    train = np.sort(order[args.calib_count :][: args.train_count])
    evaluate = factorization._subset(len(x_test), args.eval_count, np.random.default_rng(1))
    return (
        prepare(x_train[calib]),
        prepare(x_train[train]),
        y_train[train],
        prepare(x_test[evaluate]),
        y_test[evaluate],
    )


def batches(x: np.ndarray, size: int) -> list[dict[str, np.ndarray]]:
    return [{"input": x[i : i + size]} for i in range(0, len(x), size)]


def top1(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    outputs = run_model(model, batches(x, 500), threads)
    logits = next(iter(outputs.values()))
    return round(100.0 * float(np.mean(logits.argmax(axis=1) == y)), 2)


def compressed(args, original, calib) -> onnx.ModelProto:
    """The pass's model, from the cache when this method, budget and calibration made it."""
    options = dict(item.split("=", 1) for item in args.method_opt)
    key = "_".join([args.method, str(args.budget), str(args.calib_count), str(args.seed)])
    key += "".join(f"_{k}={v}" for k, v in sorted(options.items()))
    path = Path(args.cache) / f"resnet20_{key}.onnx"
    if path.exists():
        return io.load_model(path)
    spec = get_pass(args.method)
    budget = "sparsity" if args.method in ("prune", "rdprune") else "target_macs"
    options.setdefault(budget, str(args.budget))
    context = PassContext({"input": [1, 3, 32, 32]}, batches(calib, 64), seed=args.seed)
    model = spec.run(original, spec.make_options(options), context).model
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fga")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--method-opt", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--opt", action="append", default=[], help="distill.KEY=VALUE")
    parser.add_argument("--calib-count", type=int, default=512)
    parser.add_argument("--train-count", type=int, default=20000)
    parser.add_argument("--eval-count", type=int, default=10000)
    parser.add_argument("--labels", action="store_true", help="train with the true labels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="", help="a name for this run in the results")
    parser.add_argument("--cache", default=str(RESULTS / "models"))
    parser.add_argument("--out", default=str(RESULTS / "runs.jsonl"))
    args = parser.parse_args()

    original = io.load_model(factorization.SHARED_MODELS / "resnet20_cifar10.onnx")
    calib, train, train_labels, x_eval, y_eval = cifar_splits(args)
    student = compressed(args, original, calib)
    spec = get_pass("distill")
    options = dict(item.removeprefix("distill.").split("=", 1) for item in args.opt)
    options.setdefault("threads", str(args.threads))
    context = PassContext(
        {"input": [1, 3, 32, 32]},
        batches(train, 64),
        seed=args.seed,
        threads=args.threads,
        labels=train_labels if args.labels else None,
        original=original,
    )
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    typed = {"distill": spec.make_options(options)}
    distilled, reports = run_passes(student, [spec], typed, context, lambda _: None)
    seconds = time.perf_counter() - started
    row = {
        "label": args.label,
        "method": args.method,
        "budget": args.budget,
        "method_opt": args.method_opt,
        "distill": options,
        "calib_count": args.calib_count,
        "train_count": args.train_count,
        "eval_count": args.eval_count,
        "labels": args.labels,
        "top1_original": top1(original, x_eval, y_eval, 2),
        "top1_compressed": top1(student, x_eval, y_eval, 2),
        "top1_distilled": top1(distilled, x_eval, y_eval, 2),
        "seconds": round(seconds, 1),
        "summary": reports[0]["summary"],
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    row["change"] = round(row["top1_distilled"] - row["top1_original"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
