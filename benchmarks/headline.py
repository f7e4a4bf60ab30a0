"""The README's results table from one command: `python benchmarks/run.py --headline`.

Each headline model is run through the suite with its own settings (HEADLINE: the methods, the
budgets worth trying on it, its evaluation data), one model after the other; each method is
then shown at its best setting, the fastest one that loses at most TOLERANCE of the score (where
none does, the one that loses least). Every run's full table stays in
`<out>/<model>/results.md`; the headline table goes to `<out>/headline.md` and is printed."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from onnxcompress import io

# Per model: the suite's flags (as on the command line). Budgets are the ones where the
# methods' best settings were found in earlier runs (docs/results.md), so the table is reached
# in one run of about an hour on 2 cores.
HEADLINE = {
    "resnet20": [
        "--passes", "svd,cp,channels,int8,int8_dynamic,blocks,blocks+int8,auto,auto_int8",
        "--budgets", "0.5,0.35,0.25", "--block-counts", "1,2,3", "--latency-budgets", "0.5",
        "--eval-count", "2000", "--calib-count", "512",
    ],
    "squeezenet": [
        "--passes", "cp,svd,channels,int8,int8_dynamic,auto,auto_int8",
        "--budgets", "0.7,0.5", "--latency-budgets", "0.5",
        "--eval-count", "1000", "--calib-count", "300", "--opt", "auto.jobs=2",
    ],
    "minilm": [
        "--passes", "svd,prune,int8,int8_dynamic", "--budgets", "0.7,0.5",
        "--sparsities", "0.3,0.5", "--eval-count", "600", "--calib-count", "256",
    ],
}  # fmt: skip
# A setting "loses nothing that matters" within this much of the original's score.
TOLERANCE = {"top1": 1.0, "cosine_mean": 0.01}
TITLES = {
    "resnet20": "ResNet-20, CIFAR-10",
    "squeezenet": "SqueezeNet 1.0, ImageNet, fp16 file upcast in code",
    "minilm": "all-MiniLM-L6-v2, sentence embeddings",
}
METRIC_NAMES = {"top1": "top-1", "cosine_mean": "mean cosine to the original's"}
PEER = "int8_dynamic"


def model_argv(name: str, common: list[str], out: Path) -> list[str]:
    """The suite's command line for one headline model."""
    return ["--models", name, *HEADLINE[name], *common, "--no-plots", "--out", str(out / name)]


def common_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--seed",
        str(args.seed),
    ]


def parse(argv: list[str]) -> argparse.Namespace:
    """`--headline` and the few flags that go with it."""
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py --headline")
    parser.add_argument("--headline", action="store_true", required=True)
    parser.add_argument("--models", default=",".join(HEADLINE), help="a subset of the models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/headline"))
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(HEADLINE))
    if unknown:
        parser.error(f"unknown headline model {unknown[0]}; of: {', '.join(HEADLINE)}")
    args.headline_argv = [a for a in argv if a != "--headline"]
    return args


def run(args: argparse.Namespace, run_suite, parse_args, model_builders) -> str:
    """Run every headline model (`run_suite`, `parse_args` of run.py), write and return the
    table."""
    out = args.out
    entries, commands = [], []
    for name in args.models:
        argv = model_argv(name, common_flags(args), out)
        model_args = parse_args(argv)
        commands.append(model_args.command)
        results = run_suite(model_args, model_builders)
        entries += [{**e, "eval_count": model_args.eval_count} for e in results["models"]]
        entries += [{"skipped": s} for s in results["skipped"]]
    given = "python benchmarks/run.py --headline " + " ".join(
        shlex.quote(a) for a in args.headline_argv
    )
    text = table(entries, given.strip(), commands)
    io.write_bytes_atomic(text.encode(), out / "headline.md")
    return text


def best_rows(entry: dict) -> list[dict]:
    """The original, then each method at its best setting, fastest first."""
    rows = [r for r in entry["rows"] if "error" not in r and "latency_ratio" in r]
    original = next(r for r in rows if r["method"] == "original")
    metric, sign = entry["metric"], 1 if entry["higher_is_better"] else -1
    tol = TOLERANCE.get(metric, 0.0)

    def loss(row: dict) -> float:
        return sign * (original["score"][metric] - row["score"][metric])

    best = []
    for method in dict.fromkeys(r["method"] for r in rows if r is not original):
        settings = [r for r in rows if r["method"] == method]
        within = [r for r in settings if loss(r) <= tol]
        pick = (
            min(within, key=lambda r: r["latency_ratio"]) if within
            else min(settings, key=loss)
        )  # fmt: skip
        best.append(pick)
    return [original, *sorted(best, key=lambda r: r["latency_ratio"])]


def label(row: dict) -> str:
    """What the row is, as a user would ask for it."""
    method, budget = row["method"], row.get("budget")
    names = {
        "original": "original",
        "auto_int8": f"`auto` (default), latency target {budget:g}" if budget else "`auto`",
        "auto": f"`auto` float plans only (`int8=false`), {budget:g}" if budget else "`auto`",
        "int8": "`int8`",
        PEER: "† `int8_dynamic` (onnxruntime `quantize_dynamic`)",
        "blocks": f"`blocks`, {_blocks(budget)}",
        "blocks+int8": f"`blocks`, {_blocks(budget)}, then `int8`",
        "prune": f"`prune` @{budget:g} sparsity (`.onnxc`)" if budget else "`prune`",
    }
    if method in names:
        return names[method]
    return f"`{method}` @{budget:g} MACs" if budget is not None else f"`{method}`"


def table(entries: list[dict], command: str, commands: list[str]) -> str:
    """The headline table in Markdown: the command first, a block of rows per model."""
    lines = [
        f"`{command}` runs, one model after the other:",
        "",
        "```sh",
        *commands,
        "```",
        "",
        "| model (score) | method, setting | MACs | size | latency ms (speedup) | score (Δ) |",
        "|---|---|---|---|---|---|",
    ]
    skipped, errors = [], []
    for entry in entries:
        if "skipped" in entry:
            skipped.append(f"{entry['skipped']['model']}: {entry['skipped']['reason']}")
            continue
        rows = best_rows(entry)
        metric = entry["metric"]
        count = entry.get("eval_count")
        title = TITLES.get(entry["name"], entry["name"])
        first = f"{title} ({METRIC_NAMES.get(metric, metric)}{_samples(count)})"
        base = rows[0]["score"][metric]
        for i, row in enumerate(rows):
            lines.append(
                "| " + " | ".join([first if i == 0 else "", *_cells(row, metric, base)]) + " |"
            )
        errors += [
            f"{entry['name']} {r['label']}: {r['error']}" for r in entry["rows"] if "error" in r
        ]
    lines += [
        "",
        "Each method at its best setting in the run: the fastest that loses at most "
        + ", ".join(f"{v:g} {METRIC_NAMES.get(k, k)}" for k, v in TOLERANCE.items())
        + "; where none does, the one that loses least. Batch 1; latency is the median over "
        "interleaved runs of all of a model's variants in one process. † the peer baseline.",
    ]
    if errors:
        lines += ["", "Settings that did not run:", *[f"- {e}" for e in errors]]
    if skipped:
        lines += ["", "Models not run:", *[f"- {s}" for s in skipped]]
    return "\n".join(lines) + "\n"


def _blocks(count) -> str:
    return "" if count is None else f"{count:g} block" + ("" if count == 1 else "s")


def _samples(count) -> str:
    return f" on {count:,} samples" if count else ""


def _cells(row: dict, metric: str, base: float) -> list[str]:
    latency = row["latency"]["1"]
    score = row["score"][metric]
    digits = 4 if metric == "cosine_mean" else 2  # a cosine's changes sit in the 3rd decimal
    shown = f"{score:.{digits}f}"
    if row["method"] != "original":
        shown += f" ({score - base:+.{digits}f})".replace("-", "−")
    return [
        label(row),
        f"{row['macs_ratio']:.3f}",
        f"{row['size_ratio']:.3f}",
        f"{latency['median_ms']:.3f} ({latency['speedup']:.2f}×)",
        shown,
    ]
