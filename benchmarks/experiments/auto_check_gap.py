"""How far the benchmark's timing of auto's kept plan lands from auto's own check of it.

auto decides on latency ratios it measures during its pass; the benchmark times the kept
model again minutes later beside every other variant. Over `run.py` results files, this
lists per latency-target auto row the kept round's ratio in auto's check (its final windows
and, where the plans were timed again, the search's), the benchmark's ratio, and the
difference, then the difference's mean, median and spread; and, over all the plans auto timed
again at the end, the median of how much slower that re-timing read them than their search
did (a drift of the machine between the two), and how far one plan's final windows spread
(the median over its rounds of the windows' range over their median). Rows where auto's
check did not
time the kept model itself (`auto+int8`: its float plan was checked, then quantized) are
left out.

    python benchmarks/experiments/auto_check_gap.py benchmarks/results/done_when_resnet20/*/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def gaps(results: dict, source: str) -> list[dict]:
    """One entry per auto row with a latency target, a kept round and a benchmark ratio."""
    out = []
    for model in results.get("models", []):
        for row in model.get("rows", []):
            auto = (row.get("summary") or {}).get("auto") or {}
            kept = auto.get("chosen_round")
            if auto.get("budget", {}).get("kind") != "latency" or kept is None:
                continue
            if row.get("method") == "auto+int8" or "latency_ratio" not in row:
                continue
            check = auto["rounds"][kept]
            drifts = [
                r["latency_ratio"] - r["latency_ratio_search"]
                for r in auto["rounds"]
                if "latency_ratio" in r and r.get("latency_ratio_search") is not None
            ]
            out.append(
                {
                    "source": source,
                    "model": model["name"],
                    "label": row["label"],
                    "check": check["latency_ratio"],
                    "search": check.get("latency_ratio_search"),
                    "benchmark": row["latency_ratio"],
                    "gap": row["latency_ratio"] - check["latency_ratio"],
                    "retimed": len(drifts),
                    "drift": float(np.median(drifts)) if drifts else None,
                    "spread": _window_spread(auto["rounds"]),
                }
            )
    return out


def _window_spread(rounds: list[dict]) -> float | None:
    """The median over rounds of (largest - smallest window) / median window."""
    spreads = [
        (max(w) - min(w)) / float(np.median(w)) for r in rounds if (w := r.get("latency_windows"))
    ]
    return float(np.median(spreads)) if spreads else None


def summary(entries: list[dict]) -> dict:
    """Mean, median and standard deviation of the gaps (benchmark minus check)."""
    values = np.array([e["gap"] for e in entries])
    if not values.size:
        return {"count": 0}
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std()),
    }


def markdown(entries: list[dict]) -> str:
    lines = [
        "| results | model | row | auto's check | in its search | benchmark | gap "
        "| re-timed plans: end − search (median) | windows' range / median (median round) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        search = "" if e["search"] is None else f"{e['search']:.3f}"
        drift = "" if e["drift"] is None else f"{e['drift']:+.3f} over {e['retimed']}"
        spread = "" if e["spread"] is None else f"{e['spread']:.3f}"
        lines.append(
            f"| {e['source']} | {e['model']} | {e['label']} | {e['check']:.3f} | {search} "
            f"| {e['benchmark']:.3f} | {e['gap']:+.3f} | {drift} | {spread} |"
        )
    s = summary(entries)
    if s["count"]:
        lines.append(
            f"\n{s['count']} rows: gap mean {s['mean']:+.3f}, median {s['median']:+.3f}, "
            f"standard deviation {s['std']:.3f} (benchmark minus check)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="run.py results.json files")
    args = parser.parse_args(argv)
    entries = []
    for path in args.results:
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"{path}: {exc}")
        entries += gaps(results, f"{path.parent.parent.name}/{path.parent.name}")
    print(markdown(entries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
