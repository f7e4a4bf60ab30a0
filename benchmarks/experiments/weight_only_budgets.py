"""Which budget a compressing pass's weight-only fit survives: every pass at every rung of a
budget ladder, run as a user without data runs it (`python -m onnxcompress MODEL --passes P
--opt P.KEY=VALUE`, no --data: nothing refit, validated on random inputs), then the written
model scored on real labelled images the run never saw (top-1 against the original's).

    python benchmarks/experiments/weight_only_budgets.py                 # every model and pass
    python benchmarks/experiments/weight_only_budgets.py --models resnet20 --passes svd,prune \
        --out /tmp/weight_only

Budgets: `target_macs` for the factorization passes, `ratio` for channels (its default knob),
`sparsity` for prune. Each model is the suite's (`benchmarks.run.builders`: SqueezeNet's fp16
weights upcast to fp32), written to a file first; its calibration data is never passed. Also
recorded per run: exit code, verdict (judged on the random inputs), the MACs the written
model keeps, and the pass's note. Results: results.json and results.md in --out, with the
most compression per pass that every model survived. About 30 minutes on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import onnx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.run import builders  # noqa: E402

MODELS = "resnet20,squeezenet,cifar10_cnn,mnist"
PASSES = "svd,fga,tucker2,cp,lrs,channels,prune"
# Labelled images scored per model; SqueezeNet's 1000 are every ImageNet image the suite keeps
# out of calibration: 300 moved a pass across the 5-point bar (docs/decisions.md).
EVAL_COUNT = 1000
# The option each pass's default budget sets, and its ladder (least compression first).
LADDERS = {
    "target_macs": "0.95,0.9,0.8,0.7,0.6,0.5",
    "ratio": "0.05,0.1,0.2,0.3,0.4",
    "sparsity": "0.2,0.3,0.4,0.5,0.6,0.7,0.8",
}
BUDGET_OPTION = {"channels": "ratio", "prune": "sparsity"}  # the rest: target_macs
# A weight-only fit "survives" when it loses at most this many top-1 points (decisions.md).
SURVIVABLE_DROP = 5.0


def main() -> None:
    args = parse_args()
    rows, originals = [], {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            bench = _bench(name, args)
            model_path = Path(work) / f"{name}.onnx"
            onnx.save(bench.model, str(model_path))
            originals[name] = bench.score(bench.model, args.threads)[bench.metric]
            for pass_name in args.passes.split(","):
                key = BUDGET_OPTION.get(pass_name, "target_macs")
                for value in getattr(args, key).split(","):
                    row = run_pass(model_path, pass_name, key, value, Path(work), args.threads)
                    row.update(model=name, original_top1=originals[name])
                    if row.pop("written"):
                        scores = bench.score(onnx.load(row.pop("path")), args.threads)
                        row.update(top1=scores["top1"], agreement=scores["agreement"])
                        row["drop"] = originals[name] - scores["top1"]
                    rows.append(row)
                    print(line(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "command": command(),
        "survivable_drop": SURVIVABLE_DROP,
        "survivable_budgets": survivable_budgets(rows),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(rows, originals, args))
    print(f"results in {out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--passes", default=PASSES)
    for key, ladder in LADDERS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", default=ladder, help=f"{key} ladder")
    parser.add_argument("--eval-count", type=int, help=f"images scored (default {EVAL_COUNT})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "weight_only_budgets")
    )
    return parser.parse_args()


def _bench(name: str, args):
    """The suite's model with its evaluation images (its calibration images go unused)."""
    count = args.eval_count or EVAL_COUNT
    suite_args = argparse.Namespace(
        seed=0, quick=False, threads=args.threads, calib_count=1, eval_count=count
    )
    return builders()[name](suite_args)


def run_pass(model: Path, pass_name: str, key: str, value: str, work: Path, threads: int):
    """One CLI run without data; what it did, from its exit code and JSON report."""
    stem = f"{model.stem}_{pass_name}_{key}_{value.replace('.', '_')}"
    report, output = work / f"{stem}.json", work / f"{stem}.onnx"
    command = [
        sys.executable, "-m", "onnxcompress", str(model), "--passes", pass_name,
        "--opt", f"{pass_name}.{key}={value}", "-o", str(output),
        "--report", str(report), "--no-bench", "-q", "--threads", str(threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    row = {"pass": pass_name, "option": key, "value": float(value), "exit": done.returncode}
    if not report.exists():
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
        row["written"] = False
        return row
    found = json.loads(report.read_text())
    summary = found["passes"][0]["summary"]
    row.update(
        written=True,
        path=found["output"],
        macs_ratio=found["after"]["total_macs"] / found["before"]["total_macs"],
        params_ratio=found["after"]["total_params"] / found["before"]["total_params"],
        verdict=found["verdict"]["kind"],
        verdict_text=found["verdict"]["text"],
        weight_only_warning=any("no calibration data" in w for w in found["warnings"]),
        note=summary.get("note", ""),
        pass_seconds=found["passes"][0]["seconds"],
    )
    return row


def survivable_budgets(rows: list[dict]) -> dict[str, dict]:
    """Per pass, the most compressing rung of its ladder at which no measured model lost more
    than SURVIVABLE_DROP points, walking down from the least compression and stopping at the
    first rung where one did (None: the first rung already failed). A run that wrote nothing
    (a target the pass cannot reach) counts neither way."""
    found = {}
    for pass_name in dict.fromkeys(r["pass"] for r in rows):
        mine = [r for r in rows if r["pass"] == pass_name]
        option = mine[0]["option"]
        ladder = sorted({r["value"] for r in mine}, reverse=option == "target_macs")
        chosen, failed_at = None, None
        for value in ladder:
            scored = [r for r in mine if r["value"] == value and "drop" in r]
            failed = [r["model"] for r in scored if r["drop"] > SURVIVABLE_DROP]
            if failed:
                failed_at = {"value": value, "models": failed}
                break
            if scored:
                chosen = value
        found[pass_name] = {"option": option, "value": chosen, "first_failure": failed_at}
    return found


def line(row: dict) -> str:
    if "top1" not in row:
        return f"{row['model']} {row['pass']} {row['option']}={row['value']:g}: {row['error']}"
    return (
        f"{row['model']} {row['pass']} {row['option']}={row['value']:g}: exit {row['exit']} "
        f"{row['verdict']}, MACs {row['macs_ratio']:.3f}, top-1 {row['original_top1']:.1f} → "
        f"{row['top1']:.1f} ({-row['drop']:+.1f}), agreement {row['agreement']:.1f}"
    )


def markdown(rows: list[dict], originals: dict, args) -> str:
    counts = {m: args.eval_count or EVAL_COUNT for m in originals}
    lines = [
        "# Weight-only fits (no calibration data) against their budget",
        "",
        f"`{command()}`",
        "",
        "Top-1 on held-out labelled images: "
        + ", ".join(f"{m} {originals[m]:.1f} % on {counts[m]}" for m in originals)
        + f". ✓: within {SURVIVABLE_DROP:g} points of the original. Exit and verdict are the "
        "CLI's own, judged on its 4 random inputs.",
        "",
        "Most compression every model survives, per pass (a rung the pass could not reach "
        "on a model counts neither way):",
        "",
        "| pass | survivable budget | first rung that failed (models) |",
        "|---|---|---|",
        *[
            f"| {name} | {_value(found['option'], found['value'])} | "
            + (
                f"{_value(found['option'], found['first_failure']['value'])} "
                f"({', '.join(found['first_failure']['models'])})"
                if found["first_failure"]
                else "none"
            )
            + " |"
            for name, found in survivable_budgets(rows).items()
        ],
        "",
        "| model | pass | budget | MACs kept | top-1 (drop) | agreement | exit | verdict | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = f"{r['option']} {r['value']:g}"
        if "top1" not in r:
            lines.append(f"| {r['model']} | {r['pass']} | {budget} | — | — | — | {r['exit']} "
                         f"| {r['error']} | |")  # fmt: skip
            continue
        mark = "✓" if r["drop"] <= SURVIVABLE_DROP else "✗"
        lines.append(
            f"| {r['model']} | {r['pass']} | {budget} | {r['macs_ratio']:.3f} | "
            f"{r['top1']:.1f} ({-r['drop']:+.1f}) {mark} | {r['agreement']:.1f} | {r['exit']} | "
            f"{r['verdict']} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def _value(option: str, value: float | None) -> str:
    return "none survives" if value is None else f"{option} {value:g}"


def command() -> str:
    return " ".join(
        ["python benchmarks/experiments/weight_only_budgets.py", *map(shlex.quote, sys.argv[1:])]
    )


if __name__ == "__main__":
    main()
