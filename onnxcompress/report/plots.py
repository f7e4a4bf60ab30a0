"""The HTML report's charts as PNG bytes, drawn with matplotlib (the `plot` extra) on the Agg
canvas; matplotlib is imported only here, when a chart is drawn, and never changes the
caller's pyplot backend. Every function returns None when matplotlib is not installed."""

from __future__ import annotations

import io
from typing import Any

# Charts with more bars than this keep the largest ones and say so in the title.
MAX_BARS = 40
# The package is not on PyPI: `pip install onnxcompress[plot]` works nowhere; these do.
PLOT_REQUIREMENT = "matplotlib>=3.7"  # pyproject.toml's `plot` extra
INSTALL_HINT = (
    f'charts need matplotlib: pip install "{PLOT_REQUIREMENT}" '
    '(or, in the onnxcompress checkout: pip install -e ".[plot]")'
)


def plots_available() -> bool:
    return _matplotlib() is not None


def before_after_bars(rows: list[tuple[str, float, float]], title: str, unit: str) -> bytes | None:
    """Horizontal bars per layer, before and after side by side; largest `MAX_BARS` layers."""
    mpl = _matplotlib()
    if mpl is None or not rows:
        return None
    shown = sorted(rows, key=lambda row: row[1], reverse=True)[:MAX_BARS]
    if len(shown) < len(rows):
        title = f"{title} (largest {len(shown)} of {len(rows)})"
    shown.reverse()  # largest at the top
    figure = mpl.Figure(figsize=(8, 1.2 + 0.28 * len(shown)))
    mpl.Canvas(figure)
    axes = figure.add_subplot()
    positions = list(range(len(shown)))
    height = 0.4
    axes.barh([p + height / 2 for p in positions], [r[1] for r in shown], height, label="original")
    axes.barh([p - height / 2 for p in positions], [r[2] for r in shown], height, label="rewritten")
    axes.set_yticks(positions, [_short(r[0]) for r in shown], fontsize=7)
    axes.set_xlabel(unit)
    axes.set_title(title.replace("$", r"\$"), fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    return _png(figure)


def damage_cost_curve(curve: list[dict[str, Any]], title: str) -> bytes | None:
    """Damage against cost ratio for every point the auto pass considered, chosen ones marked."""
    mpl = _matplotlib()
    points = [p for p in curve if p.get("cost_ratio") is not None and p.get("damage") is not None]
    if mpl is None or not points:
        return None
    points.sort(key=lambda p: p["cost_ratio"])
    figure = mpl.Figure(figsize=(6, 4))
    mpl.Canvas(figure)
    axes = figure.add_subplot()
    axes.plot(
        [p["cost_ratio"] for p in points],
        [p["damage"] for p in points],
        marker=".",
        label="candidates",
    )
    chosen = [p for p in points if p.get("chosen")]
    if chosen:
        axes.scatter(
            [p["cost_ratio"] for p in chosen],
            [p["damage"] for p in chosen],
            s=80,
            color="red",
            zorder=3,
            label="chosen",
        )
    axes.set_xlabel("cost after / before")
    axes.set_ylabel("damage")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


class _Matplotlib:
    def __init__(self, figure: type, canvas: type) -> None:
        self.Figure = figure
        self.Canvas = canvas


def _matplotlib() -> _Matplotlib | None:
    try:
        import matplotlib  # noqa: F401  (fails first when missing, even if submodules are cached)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return _Matplotlib(Figure, FigureCanvasAgg)


def _png(figure: Any) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _short(name: str, limit: int = 40) -> str:
    name = name if len(name) <= limit else "…" + name[-(limit - 1) :]
    return name.replace("$", r"\$")  # a lone $ would start matplotlib's math mode
