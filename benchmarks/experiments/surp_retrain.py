"""SuRP (`rdprune`) against magnitude pruning (`prune`, quantised survivors), both coded as
`.onnxc`, with and without the same retraining (`retrain_steps` rounds of distillation toward
the original, zeros held), compared at equal top-1 on ResNet-20 CIFAR-10 (issue 24).

    python benchmarks/experiments/surp_retrain.py --out benchmarks/results/surp_retrain_resnet20

Each variant (`pass:key=value;...`) runs through `run_passes` on `--calib-count` CIFAR-10
training images (no labels; distillation holds 10 % out), then is scored on a seeded subset
of the test images: top-1, agreement and relative L2 of the logits against the original,
nonzero weights, and the bytes of the `.onnxc` file (the coded weights a pass handed over,
else the generic sparse coder; `prune`'s 2**bits-level survivors go to its codebook). A
family is a pass with its options other than `sparsity`; each family's size at a given top-1
is interpolated (log bytes, linear in top-1) between its two nearest measured points, and
the tables give every measured point too. results.md and results.json are rewritten after
each variant, so a long run keeps what it has measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from onnxcompress.passes import get_pass  # noqa: E402

from benchmarks.experiments.pruning import measure, parse_variant  # noqa: E402
from benchmarks.factorization import DATASETS, predict  # noqa: E402
from onnxcompress import CompressError, graph  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402
from onnxcompress.pipeline import run_passes  # noqa: E402

METHODS = (
    "rdprune:compare=false;",
    "prune:keep=none;quantize_bits=4;",
    "prune:keep=none;quantize_bits=6;",
)
# Untrained, pruning holds only at low sparsity; retrained, higher (results.md, Pruning).
SPARSITIES = {"": (0.2, 0.3, 0.4, 0.5), ";retrain_steps=300;rounds=3": (0.5, 0.65, 0.8)}
DEFAULT_VARIANTS = ",".join(
    f"{method}sparsity={sparsity}{retrain}"
    for retrain, sparsities in SPARSITIES.items()
    for sparsity in sparsities
    for method in METHODS
)
DROPS = (0.5, 1.0, 2.0, 3.0, 5.0)  # top-1 points below the original at which families compare


def family(text: str) -> str:
    """The variant without its sparsity: `prune:keep=none;quantize_bits=4`."""
    name, options = parse_variant(text)
    rest = ";".join(f"{k}={v}" for k, v in options.items() if k != "sparsity")
    return f"{name}:{rest}" if rest else name


def run_variant(text: str, data, context: PassContext, reference, args) -> dict:
    name, options = parse_variant(text)
    spec = get_pass(name)
    coded: list = []
    started = time.perf_counter()
    model, reports = run_passes(
        data.model, [spec], {name: spec.make_options(options)}, context, lambda _s: None, coded
    )
    graph.check_model(model)
    row = measure(model, coded, data, reference, args.threads)
    retraining = reports[0]["summary"].get("retraining", {})
    row.update(
        variant=text,
        family=family(text),
        seconds=round(time.perf_counter() - started, 1),
        train_seconds=retraining.get("seconds", 0.0),
        train_steps=retraining.get("steps", 0),
        rounds=retraining.get("rounds", []),
    )
    return row


def size_at(points: list[tuple[float, int]], accuracy: float) -> float | None:
    """Bytes at `accuracy` on a family's curve of (top-1, bytes) points: log bytes
    interpolated linearly in top-1 between the two Pareto points around it (no point both
    more accurate and smaller is skipped over); None outside the measured range."""
    pareto = sorted(p for p in points if not any(q != p and q[0] >= p[0] and q[1] <= p[1]
                                                 for q in points))  # fmt: skip
    for (a0, b0), (a1, b1) in zip(pareto, pareto[1:], strict=False):
        if a0 <= accuracy <= a1:
            t = (accuracy - a0) / (a1 - a0)
            return float(np.exp((1 - t) * np.log(b0) + t * np.log(b1)))
    return float(pareto[0][1]) if len(pareto) == 1 and pareto[0][0] == accuracy else None


def equal_accuracy(rows: list[dict], original: float) -> list[dict]:
    """Per drop below the original's top-1, each family's bytes there (or None)."""
    families: dict[str, list[tuple[float, int]]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append((row["accuracy"], row["onnxc_bytes"]))
    out = []
    for drop in DROPS:
        target = original - drop / 100
        sizes = {name: size_at(points, target) for name, points in families.items()}
        out.append({"drop": drop, "top1": target, "bytes": sizes})
    return out


def factors(entry: dict) -> list[str]:
    """Each magnitude family's bytes over the SuRP family's with the same retraining options
    (> 1: SuRP smaller), at one equal-accuracy entry."""

    def retraining(name: str) -> tuple:
        options = parse_variant(name)[1]
        return options.get("retrain_steps"), options.get("rounds")

    sizes = entry["bytes"]
    surp = {retraining(n): b for n, b in sizes.items() if n.startswith("rdprune") and b}
    return [
        f"- −{entry['drop']} pts, {name}: {size / surp[retraining(name)]:.2f}×"
        for name, size in sizes.items()
        if name.startswith("prune") and size and retraining(name) in surp
    ]


def markdown(result: dict) -> str:
    rows, original = result["rows"], result["original"]
    lines = [f"`{result['command']}` — {result['machine']}", "", f"- {result['data']}", ""]
    lines += [
        "| variant | nonzero | .onnxc | top-1 | drop (pts) | agreement | rel L2 "
        "| training s (steps) | pass s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| original | 1.000 | {original['onnxc_bytes'] / 1e3:.1f} kB "
        f"| {100 * original['accuracy']:.2f} % | | | | | |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['nonzero'] / r['weights']:.3f} "
            f"| {r['onnxc_bytes'] / 1e3:.1f} kB | {100 * r['accuracy']:.2f} % "
            f"| {100 * (original['accuracy'] - r['accuracy']):+.2f} "
            f"| {100 * r['agreement']:.1f} % | {r['rel_l2']:.3f} "
            f"| {r['train_seconds']:.0f} ({r['train_steps']}) | {r['seconds']:.0f} |"
        )
    lines += ["", "Size at equal top-1 (interpolated; — outside a family's measured range):", ""]
    table = result["equal_accuracy"]
    names = sorted({name for entry in table for name in entry["bytes"]})
    lines += ["| top-1 (drop) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for entry in table:
        cells = [f"{b / 1e3:.1f} kB" if b else "—" for b in map(entry["bytes"].get, names)]
        lines.append(
            f"| {100 * entry['top1']:.2f} % (−{entry['drop']}) | " + " | ".join(cells) + " |"
        )
    lines += ["", "Magnitude bytes over SuRP bytes at equal top-1, same retraining:", ""]
    lines += [line for entry in table for line in factors(entry)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="pass:key=value;… ,…")
    parser.add_argument("--calib-count", type=int, default=2000, help="calibration images")
    parser.add_argument("--eval-count", type=int, default=2000, help="evaluation images")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime and torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks/results/surp_retrain_resnet20"
    )
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data = DATASETS["resnet20"](args)
    shapes = graph.resolve_input_shapes(data.model)
    context = PassContext(shapes, data.calibration, seed=args.seed, threads=args.threads)
    reference = predict(data.model, data.evaluation, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/experiments/surp_retrain.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime "
        f"{ort.__version__} CPU, {args.threads} thread(s), seed {args.seed}",
        "data": f"calibration: {data.calibration_note}; evaluation: {data.evaluation_note}",
        "original": measure(data.model, [], data, reference, args.threads),
        "rows": [],
    }
    for text in args.variants:
        try:
            row = run_variant(text, data, context, reference, args)
        except CompressError as exc:
            print(f"{text}: error: {exc}", flush=True)
            continue
        result["rows"].append(row)
        result["equal_accuracy"] = equal_accuracy(result["rows"], result["original"]["accuracy"])
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
        (args.out / "results.md").write_text(markdown(result))
        print(f"{text}: top-1 {100 * row['accuracy']:.2f} %, {row['onnxc_bytes']:,} bytes, "
              f"{row['seconds']:.0f} s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
