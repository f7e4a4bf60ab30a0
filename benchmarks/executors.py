"""Wall time of `auto` by where its jobs run: serial, `--jobs 2` worker processes, and
`--executor ray` (a local Ray cluster started by the run), on the same model and data, each
run a fresh process with empty caches (sensitivity results and latencies are cached across
runs otherwise), the executors taken in turn `--repeats` times so that the machine's load
hits each alike; the load average before and after each run is kept.

    python benchmarks/executors.py                                  # resnet20, 2 repeats
    python benchmarks/executors.py --repeats 3 --opt auto.target_macs=0.5 --out /tmp/ex

Not a pass/fail test: on a 2-core machine Ray's start-up (a cluster, its worker processes)
is paid for out of the same two cores the jobs run on.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tool_speed import _write_inputs  # noqa: E402

EXECUTORS = {
    "serial": ["--jobs", "1"],
    "jobs 2": ["--jobs", "2"],
    "ray": ["--executor", "ray"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calib-count", type=int, default=256)
    parser.add_argument("--opt", action="append", default=[], help="auto option, repeatable")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "executors"))
    args = parser.parse_args()
    args.seed, args.quick, args.threads, args.eval_count = 0, False, 2, 100
    rows = []
    with tempfile.TemporaryDirectory() as work:
        _, model, data = _write_inputs(args.model, args, Path(work))
        for repeat in range(args.repeats):
            for name, flags in EXECUTORS.items():
                rows.append({"repeat": repeat, "executor": name, **_run(model, data, flags, args)})
                print(json.dumps(rows[-1]), flush=True)
    summary = _summary(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = {"command": " ".join(["python benchmarks/executors.py", *sys.argv[1:]])}
    found.update(cpus=os.cpu_count(), rows=rows, summary=summary)
    (out / "results.json").write_text(json.dumps(found, indent=1))
    print(json.dumps(summary, indent=1))


def _run(model: Path, data: Path, flags: list[str], args) -> dict:
    """One CLI run of auto with `flags`, its caches in a folder of its own."""
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "report.json"
        options = [item for opt in args.opt for item in ("--opt", opt)]
        command = [
            sys.executable, "-m", "onnxcompress", str(model), "--passes", "auto",
            "--data", str(data), "-q", "--no-bench", "-o", str(Path(work) / "out.onnx"),
            "--report", str(report), *options, *flags,
        ]  # fmt: skip
        environment = {**os.environ, "ONNXCOMPRESS_CACHE_DIR": str(Path(work) / "cache")}
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        row = {
            "exit": done.returncode,
            "waited_seconds": round(time.perf_counter() - start, 1),
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
        }
        if not report.exists():
            row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:300]
            return row
        found = json.loads(report.read_text())
        row["pass_seconds"] = round(sum(p.get("seconds") or 0 for p in found["passes"]), 1)
        row["plan"] = _plan(found)
        return row


def _plan(report: dict) -> list:
    """(node, method, form, rank) of every rewritten layer: what must not depend on the executor."""
    records = [r for p in report["passes"] for r in p.get("records", [])]
    return [
        [r["node"], *(r.get("details", {}).get(key) for key in ("method", "form", "rank"))]
        for r in records
        if r["status"] == "rewritten"
    ]


def _summary(rows: list[dict]) -> dict:
    """Per executor: every run's wall time, their min and max; whether all plans agree."""
    summary = {}
    for name in EXECUTORS:
        waited = [r["waited_seconds"] for r in rows if r["executor"] == name and r["exit"] == 0]
        summary[name] = {"waited_seconds": waited, "min": min(waited, default=None),
                         "max": max(waited, default=None)}  # fmt: skip
    plans = {json.dumps(r.get("plan")) for r in rows if r["exit"] == 0}
    summary["same_plan_everywhere"] = len(plans) == 1
    return summary


if __name__ == "__main__":
    main()
