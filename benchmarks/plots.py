"""Plots of a `benchmarks/run.py` result: per model, its score and its latency against MACs
(one curve per method, the original as a star), and its score against stored bytes (where the
pruning methods and the int8 baseline differ). matplotlib is the `plot` extra, imported only
here and only when plots are written; without it the run says so and writes none."""

from __future__ import annotations

from pathlib import Path

from benchmarks.same_latency import judged_batch
from onnxcompress import io
from onnxcompress.report.plots import INSTALL_HINT

MISSING = f"no plots written: {INSTALL_HINT}"


def write_plots(results: dict, folder: Path) -> tuple[list[Path], str | None]:
    """Write `<model>_score_vs_macs.png`, `<model>_latency_vs_macs.png`,
    `<model>_score_vs_bytes.png` and `<model>_score_vs_latency.png` for every model into
    `folder`; (paths, None), or ([], why not) when matplotlib cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return [], MISSING
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in results["models"]:
        for kind, x_key, y_of, y_label in _views(entry):
            figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=110)
            _draw(axes, entry, x_key, y_of)
            x_label, x_name = X_AXES[x_key]
            x_label = x_label.format(batch=judged_batch(entry))
            axes.set_xlabel(x_label)
            axes.set_ylabel(y_label)
            axes.set_title(f"{entry['name']}: {y_label} vs {x_name}")
            axes.grid(True, alpha=0.3)
            axes.legend(fontsize=7, loc="best")
            figure.tight_layout()
            path = folder / f"{entry['name']}_{kind}.png"
            written.append(_save(figure, path))
            plt.close(figure)
    return written, None


# Ratios above this (e.g. int8 running slower than the original) would squash every other
# point into a corner; they are left out and the legend says so.
X_LIMIT = 2.0
# One colour and marker per method: more methods than matplotlib's 10-colour default cycle.
COLORS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#000080", "#808000",
]  # fmt: skip
MARKERS = "osD^v<>pPXh*"

X_AXES = {
    "macs_ratio": ("MACs / original MACs", "MACs"),
    "size_ratio": ("size / original .onnx", "size"),
    "latency_ratio": ("latency / original latency, batch {batch}", "latency"),
}


def _views(entry: dict):
    metric = entry["metric"]
    direction = "higher is better" if entry["higher_is_better"] else "lower is better"
    score_label = f"{metric} ({direction})"
    batch = str(judged_batch(entry))

    def score(row):
        return row.get("score", {}).get(metric)

    def latency(row):
        return row.get("latency", {}).get(batch, {}).get("median_ms")

    return [
        ("score_vs_macs", "macs_ratio", score, score_label),
        ("latency_vs_macs", "macs_ratio", latency, f"latency ms, batch {batch}"),
        ("score_vs_bytes", "size_ratio", score, score_label),
        ("score_vs_latency", "latency_ratio", score, score_label),
    ]


def curves(entry: dict, x_key: str, y_of) -> dict[str, list[tuple[float, float]]]:
    """Method → points (x, y) sorted by x, from the rows without error; "original" included."""
    points: dict[str, list[tuple[float, float]]] = {}
    for row in entry["rows"]:
        y = y_of(row)
        if "error" in row or y is None or row.get(x_key) is None:
            continue
        points.setdefault(row["method"], []).append((row[x_key], y))
    return {method: sorted(values) for method, values in points.items()}


def _draw(axes, entry: dict, x_key: str, y_of) -> None:
    for method, points in curves(entry, x_key, y_of).items():
        xs, ys = zip(*points, strict=True)
        if method == "original":
            axes.plot(xs, ys, "k*", markersize=12, label="original", zorder=5)
            continue
        shown = [(x, y) for x, y in points if x <= X_LIMIT]
        label = method if len(shown) == len(points) else f"{method} (x > {X_LIMIT:g} not shown)"
        index = len(axes.lines)
        xs, ys = zip(*shown, strict=True) if shown else ((), ())
        axes.plot(
            xs, ys, marker=MARKERS[index % len(MARKERS)], color=COLORS[index % len(COLORS)],
            markersize=5, linewidth=1.2, label=label,
        )  # fmt: skip


def _save(figure, path: Path) -> Path:
    import io as bytes_io

    buffer = bytes_io.BytesIO()
    figure.savefig(buffer, format="png")
    io.write_bytes_atomic(buffer.getvalue(), path)
    return path
