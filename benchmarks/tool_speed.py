"""How long the tool itself takes, as a user runs it: `python -m onnxcompress MODEL --passes P
--data calib.npz` for every pass on every model, in a fresh process each, with the suite's
calibration data; the wall time the user waits (process start to exit), the run's own wall
time and peak memory from its report, the pass's own seconds, the exit code and verdict, and
the written model's score on the suite's evaluation data, which the run never saw.

    python benchmarks/tool_speed.py                                    # resnet20, squeezenet
    python benchmarks/tool_speed.py --models resnet20 --passes svd,cp --out /tmp/speed
    python benchmarks/tool_speed.py --models squeezenet --passes fga+prune  # one run, two passes

Issue 25's goals: every pass with data ≤ 60 s on a model up to ~500 M MACs, `auto` ≤ 5
minutes, on a quiet 2-core machine; the load average at the start and end of each run is
printed so a reader can tell a quiet run from a loaded one. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.run import builders  # noqa: E402

DEFAULT_PASSES = "svd,cp,tucker2,fga,channels,prune,int8,auto"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,squeezenet")
    parser.add_argument("--passes", default=DEFAULT_PASSES)
    parser.add_argument("--calib-count", type=int, default=256)
    parser.add_argument("--eval-count", type=int, default=100, help="unseen samples scored")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tool_speed"))
    args = parser.parse_args()
    args.seed, args.quick, args.threads = 0, False, 2
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            bench, model_path, data_path = _write_inputs(name, args, Path(work))
            original = bench.score(bench.model, args.threads)[bench.metric]
            for pass_name in args.passes.split(","):
                row = _run(name, model_path, data_path, pass_name, Path(work))
                written = Path(work) / f"{name}_{pass_name}.onnx"
                if written.exists():
                    after = bench.score(onnx.load(str(written)), args.threads)[bench.metric]
                    row[f"{bench.metric} original → written"] = f"{original:.4g} → {after:.4g}"
                rows.append(row)
                print(_line(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": _command(), "rows": rows}, indent=1))
    (out / "results.md").write_text(_markdown(rows))
    print(f"results in {out}")


def _write_inputs(name: str, args, work: Path):
    """The suite's model (as the suite prepares it) and its calibration samples as one .npz."""
    bench = builders()[name](args)
    model_path = work / f"{name}.onnx"
    onnx.save(bench.model, str(model_path))
    arrays = {
        key: np.concatenate([batch[key] for batch in bench.calibration])
        for key in bench.calibration[0]
    }
    data_path = work / f"{name}_calib.npz"
    np.savez(data_path, **arrays)
    return bench, model_path, data_path


def _run(name: str, model: Path, data: Path, pass_name: str, work: Path) -> dict:
    report = work / f"{name}_{pass_name}.json"
    command = [
        sys.executable, "-m", "onnxcompress", str(model), "--passes", pass_name.replace("+", ","),
        "--data", str(data), "-q", "-o", str(work / f"{name}_{pass_name}.onnx"),
        "--report", str(report),
    ]  # fmt: skip
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    waited = time.perf_counter() - start
    row = {
        "model": name,
        "pass": pass_name,
        "exit": done.returncode,
        "waited_seconds": round(waited, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    if report.exists():
        found = json.loads(report.read_text())
        resources = found.get("resources") or {}
        row["run_seconds"] = resources.get("wall_seconds")
        row["peak_mib"] = round((resources.get("peak_memory_bytes") or 0) / 2**20)
        row["pass_seconds"] = sum(p.get("seconds") or 0 for p in found.get("passes", []))
        row["verdict"] = (found.get("verdict") or {}).get("kind")
    else:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return row


def _line(row: dict) -> str:
    outcome = row.get("verdict") or row.get("error", "")
    outcome += "".join(f"; {k} {v}" for k, v in row.items() if "→ written" in k)
    return (
        f"{row['model']} {row['pass']}: exit {row['exit']}, waited {row['waited_seconds']} s "
        f"(pass {row.get('pass_seconds', '—')} s, peak {row.get('peak_mib', '—')} MiB, "
        f"load {row['load_before']} → {row['load_after']}) {outcome}"
    )


def _markdown(rows: list[dict]) -> str:
    lines = [
        "# The tool's own time per pass",
        "",
        f"`{_command()}`",
        "",
        "| model | pass | exit | waited s | pass s | peak MiB | load before → after | verdict "
        "| score on unseen data, original → written |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        score = next((f"{k.split()[0]} {v}" for k, v in r.items() if "→ written" in k), "—")
        lines.append(
            f"| {r['model']} | {r['pass']} | {r['exit']} | {r['waited_seconds']} | "
            f"{r.get('pass_seconds', '—')} | {r.get('peak_mib', '—')} | "
            f"{r['load_before']} → {r['load_after']} | {r.get('verdict') or r.get('error', '')} "
            f"| {score} |"
        )
    return "\n".join(lines) + "\n"


def _command() -> str:
    return "python benchmarks/tool_speed.py " + " ".join(sys.argv[1:])


if __name__ == "__main__":
    main()
