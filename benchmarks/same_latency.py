"""auto against every single method at the same measured latency: the issue's done-when asks
for a smaller accuracy drop than each method *at auto's measured latency*, and a method's rows
sit at their own latencies (cp@0.25 at 0.59 while auto sits at 0.54). A method's drop at
auto's latency is interpolated linearly between its two rows that bracket it (its budgets);
a latency outside its measured rows is said, not extrapolated. A row another row of the same
method beats at both (faster and losing no more) is left out."""

from __future__ import annotations

import numpy as np


def comparisons(entry: dict) -> list[dict]:
    """Per auto row and single method: the method's drop at auto's latency (or None when
    its rows do not bracket it), the latency range its rows cover and auto's own drop."""
    points = _points(entry)
    autos = {label: p for label, p in points.items() if p["method"].startswith("auto")}
    singles: dict[str, list[dict]] = {}
    for p in points.values():
        if not p["method"].startswith("auto") and p["method"] != "original":
            singles.setdefault(p["method"], []).append(p)
    out = []
    for label, auto in autos.items():
        for method, every in singles.items():
            rows = _frontier(every)
            ratios = np.array([r["ratio"] for r in rows])
            order = np.argsort(ratios)
            drops = np.array([rows[i]["drop"] for i in order])
            inside = ratios.min() <= auto["ratio"] <= ratios.max()
            at = float(np.interp(auto["ratio"], ratios[order], drops)) if inside else None
            fastest = rows[order[0]]
            better = [r for r in rows if r["ratio"] < auto["ratio"] and r["drop"] <= auto["drop"]]
            out.append(
                {
                    "auto": label,
                    "auto_ratio": auto["ratio"],
                    "auto_drop": auto["drop"],
                    "method": method,
                    "rows": [rows[i]["label"] for i in order],
                    "range": (float(ratios.min()), float(ratios.max())),
                    "drop_at_auto_latency": at,
                    "fastest_drop": fastest["drop"],
                    "dominated_by": better[0]["label"] if better else None,
                }
            )
    return out


def markdown_lines(entry: dict) -> list[str]:
    """The comparison as a table under the model's table (nothing without an auto row)."""
    found = comparisons(entry)
    if not found:
        return []
    metric = entry["metric"]
    lines = [
        "",
        f"### auto against each method at auto's measured latency ({metric}, batch "
        f"{judged_batch(entry)})",
        "",
        "A method's drop there is interpolated between its two rows whose latencies bracket "
        "auto's, among its rows that no other of its rows beats at both latency and drop. "
        "Where auto is faster than all of a method's rows, it is said whether auto "
        "also loses less than the method's fastest row (then it is better at both); where it "
        "is slower than all of them, whether one of them also loses no more (then it is worse "
        "at both).",
        "",
        "| auto | latency | its drop | method | its rows' latencies | its drop there "
        "| auto smaller |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in found:
        low, high = c["range"]
        span = f"{low:.3f}" if low == high else f"{low:.3f}–{high:.3f}"
        there, smaller = _verdict(c)
        lines.append(
            f"| {c['auto']} | {c['auto_ratio']:.3f} | {c['auto_drop']:.2f} | {c['method']} "
            f"| {span} ({', '.join(c['rows'])}) | {there} | {smaller} |"
        )
    return lines


def _frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats at both (as fast or faster and losing no more, one of them
    strictly): a slower row that loses more is never the method's best at any latency
    (ResNet-20, 1 thread: cp@0.2 timed slower than cp@0.25 and lost 1.4 points more)."""

    def beaten(r: dict) -> bool:
        return any(
            o["ratio"] <= r["ratio"] and o["drop"] <= r["drop"] and o is not r
            and (o["ratio"] < r["ratio"] or o["drop"] < r["drop"])
            for o in rows
        )  # fmt: skip

    return [r for r in rows if not beaten(r)]


def _verdict(c: dict) -> tuple[str, str]:
    """The method's drop at auto's latency and whether auto's is smaller, as table cells."""
    at, low = c["drop_at_auto_latency"], c["range"][0]
    if at is not None:
        return f"{at:.2f}", "yes" if c["auto_drop"] < at else "no"
    if c["auto_ratio"] < low:
        better = c["auto_drop"] < c["fastest_drop"]
        fastest = f"{c['fastest_drop']:.2f} at {low:.3f}"
        return f"not reached (fastest row: {fastest})", "yes, and faster" if better else ""
    if c["dominated_by"]:  # faster and loses no more: auto is worse at both
        return "its rows are all faster", f"no: {c['dominated_by']} is faster, loses no more"
    return "its rows are all faster", ""


def judged_batch(entry: dict) -> int:
    """The batch a model's latency ratios were read at (`run.py --batch`; before the option:
    the smallest batch timed)."""
    return entry.get("judged_batch", min(entry["latency_batches"]))


def _points(entry: dict) -> dict[str, dict]:
    """Rows with a measured latency ratio and score: label → method, ratio, drop (points of
    the metric lost against the original, positive = worse)."""
    metric, sign = entry["metric"], 1.0 if entry["higher_is_better"] else -1.0
    rows = [r for r in entry["rows"] if "error" not in r]
    base = next((r for r in rows if r["method"] == "original"), None)
    if base is None or base.get("score", {}).get(metric) is None:
        return {}
    points = {}
    for row in rows:
        score = row.get("score", {}).get(metric)
        if score is None or row.get("latency_ratio") is None:
            continue
        points[row["label"]] = {
            "label": row["label"],
            "method": row["method"],
            "ratio": float(row["latency_ratio"]),
            "drop": sign * (base["score"][metric] - score),
        }
    return points
