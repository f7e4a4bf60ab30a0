"""Command line: parses flags, shows progress, prints the report, maps errors to exit codes.

python -m onnxcompress model.onnx --passes fold_bn -o out.onnx
python -m onnxcompress model.onnx --passes prune -o out.onnxc   (entropy-coded model file)
python -m onnxcompress decode out.onnxc [-o model.onnx]
python -m onnxcompress analyse model.onnx [--json table.json]
python -m onnxcompress --list-passes
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console

from onnxcompress import cli_types
from onnxcompress.errors import CompressError
from onnxcompress.passkit import comma_list
from onnxcompress.report.progress import TerminalProgress

EXIT_OK, EXIT_VALIDATION, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CompressError(f"{message} (see {self.prog} --help)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:D0,D1,...",
        help="pin an input's shape (dynamic dims), e.g. input:1,3,224,224",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log details and show tracebacks"
    )


def compress_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m onnxcompress",
        description="Compress an ONNX model; validate and time it with onnxruntime.",
    )
    p.add_argument("model", nargs="?", help="input .onnx file (never modified)")
    p.add_argument("--passes", help="comma-separated passes to run in order, e.g. fold_bn")
    p.add_argument(
        "-o",
        "--output",
        help="output .onnx, or .onnxc for an entropy-coded file that `decode` turns back "
        "into .onnx (default: <model>.compressed.onnx, or <model>.compressed-2.onnx, ... if "
        "that exists: a default never replaces a file)",
    )
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="PASS.KEY=VALUE",
        help="a pass option, e.g. --opt fga.groups=4 (repeatable)",
    )
    p.add_argument("--config", help="TOML file: optional `passes = [...]`, one table per pass")
    p.add_argument("--list-passes", action="store_true", help="list passes and their options")
    p.add_argument("--data", help=".npz with one array per input name (+ optional 'labels')")
    p.add_argument("--images", help="folder of images used as calibration/validation inputs")
    p.add_argument(
        "--preprocess",
        help="image preprocessing spec, e.g. 'resize=224,mean=104;117;123,bgr' (lists split by ;)",
    )
    p.add_argument("--labels", help="labels for --images: '<file>, <int>' lines or one int a line")
    p.add_argument(
        "--calib-count", type=cli_types.at_least_one, help="use at most this many samples"
    )
    p.add_argument(
        "--batch-size", type=cli_types.at_least_one, help="batch size for data runs (dynamic batch)"
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.25,
        help="fraction of --data/--images samples kept out of refit and used only "
        "to validate (default 0.25). 0 gives the passes every sample: if they read them, the "
        "run is 'not validated' and --max-rel-l2 fails it",
    )
    p.add_argument(
        "--seed", type=cli_types.seed, default=0, help="seed for random inputs (default 0)"
    )
    p.add_argument(
        "--input-range",
        action="append",
        default=[],
        metavar="[NAME:]LO,HI",
        help="without data, draw random values of input NAME (all float inputs without NAME) "
        "uniformly in [LO, HI], e.g. the model's documented range: --input-range=-1,1 "
        "(repeatable; default: standard normal)",
    )
    p.add_argument(
        "--threads",
        type=cli_types.up_to_cores,
        default=2,
        help="onnxruntime threads, at most the cores this process may use (default 2)",
    )
    p.add_argument(
        "--jobs",
        type=cli_types.up_to_cores,
        default=1,
        help="worker processes for independent jobs (auto)",
    )
    p.add_argument("--no-bench", action="store_true", help="skip the latency benchmark")
    p.add_argument(
        "--bench-repeats", type=cli_types.at_least_one, default=30, help="timed runs per model"
    )
    p.add_argument(
        "--max-rel-l2",
        type=cli_types.non_negative_number,
        help="exit 1 if any output's relative L2 error exceeds this, or if the run is not "
        "validated (the passes read every sample: none held out)",
    )
    p.add_argument(
        "--report",
        help="a folder (made if its parent exists) for report.json, report.md and report.html "
        "with plots; or a .json file for the JSON report alone",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    _common(p)
    return p


def analyse_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m onnxcompress analyse",
        description="Per-layer parameters, MACs and output bytes of an ONNX model.",
    )
    p.add_argument("model", help="input .onnx file")
    p.add_argument("--json", help="write the table as JSON to this path")
    p.add_argument(
        "--top", type=cli_types.at_least_one, help="show only the N layers with the most MACs"
    )
    _common(p)
    return p


def decode_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m onnxcompress decode",
        description="Restore a standard .onnx model from a .onnxc file.",
    )
    p.add_argument("model", help="input .onnxc file (never modified)")
    p.add_argument(
        "-o",
        "--output",
        help="output .onnx (default: <name>.onnx beside the input, or <name>-2.onnx, ... "
        "if that exists: a default never replaces a file)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    return p


def parse_input_ranges(items: list[str]) -> dict[str, tuple[float, float]]:
    """`[NAME:]LO,HI` items as {name: (lo, hi)}, "" for all inputs; checked against the model
    when the random inputs are drawn."""
    ranges = {}
    for item in items:
        name, _, bounds = item.rpartition(":")  # names may hold ':' (e.g. 'input:0')
        try:
            low, high = (float(value) for value in bounds.split(","))
        except ValueError:
            raise CompressError(
                f"--input-range {item!r}: expected [NAME:]LO,HI, e.g. pixel_values:-1,1"
            ) from None
        ranges[name] = (low, high)
    return ranges


def parse_input_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",")]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise CompressError(f"--input-shape {item!r}: expected NAME:D0,D1,... with dims > 0")
        shapes[name] = values
    return shapes


def parse_pass_options(items: list[str], config: str | None) -> tuple[list[str], dict]:
    """Options from a TOML config, then --opt flags on top; returns (config passes, options)."""
    passes: list[str] = []
    options: dict[str, dict[str, Any]] = {}
    if config:
        passes, options = _read_config(config)
    for item in items:
        key, sep, value = item.partition("=")
        pass_name, dot, option_name = key.partition(".")
        if not sep or not dot or not pass_name or not option_name:
            raise CompressError(f"--opt {item!r}: expected PASS.KEY=VALUE, e.g. fga.groups=4")
        options.setdefault(pass_name.strip(), {})[option_name.strip()] = value.strip()
    return passes, options


def _read_config(path: str) -> tuple[list[str], dict]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise CompressError(f"--config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CompressError(f"--config {path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CompressError(
            f"--config {path}: not UTF-8 text at byte {exc.start}; save the TOML file as UTF-8"
        ) from exc
    passes = data.pop("passes", [])
    if isinstance(passes, str):
        passes = comma_list(passes)
    bad = [key for key, value in data.items() if not isinstance(value, dict)]
    if bad or not isinstance(passes, list):
        raise CompressError(f"--config {path}: expected `passes = [...]` and one [table] per pass")
    return passes, data


def list_passes(console: Console) -> None:
    from rich.table import Table

    from onnxcompress import registry
    from onnxcompress.passkit import option_help

    for name in sorted(registry.all_passes()):
        spec = registry.all_passes()[name]
        console.print(f"[bold]{name}[/bold] — {spec.help}")
        fields = spec.option_fields()
        if not fields:
            console.print("  (no options)")
            continue
        table = Table(show_header=True, box=None, padding=(0, 2))
        for column in ("option", "default", "help"):
            table.add_column(column)
        for f in fields:
            table.add_row(f"{name}.{f.name}", repr(f.default), option_help(f))
        console.print(table)


def run_compress(args: argparse.Namespace, console: Console) -> int:
    from onnxcompress.pipeline import CompressOptions, compress, default_output
    from onnxcompress.report.terminal import fidelity_table, pass_lines, summary_table

    if args.list_passes:
        list_passes(Console())
        return EXIT_OK
    if not args.model:
        raise CompressError("no model given: python -m onnxcompress MODEL.onnx --passes NAMES")
    config_passes, pass_options = parse_pass_options(args.opt, args.config)
    names = comma_list(args.passes) or config_passes
    options = CompressOptions(
        passes=names,
        pass_options=pass_options,
        output=args.output,
        input_shapes=parse_input_shapes(args.input_shape),
        data=args.data,
        images=args.images,
        preprocess=args.preprocess,
        labels=args.labels,
        calibration_count=args.calib_count,
        batch_size=args.batch_size,
        holdout=args.holdout,
        input_ranges=parse_input_ranges(args.input_range),
        seed=args.seed,
        threads=args.threads,
        jobs=args.jobs,
        bench=not args.no_bench,
        bench_repeats=args.bench_repeats,
        max_rel_l2=args.max_rel_l2,
        report=args.report,
    )
    # Off a terminal rich draws nothing but would leave an empty line before an error.
    shown_on_terminal = not args.quiet and console.is_terminal
    display = TerminalProgress(console) if shown_on_terminal else nullcontext()
    with display as shown:
        if shown is None:
            result = compress(args.model, options)
        else:
            result = compress(args.model, options, on_step=shown.step, progress=shown)
    out = Console()
    for line in pass_lines(result.report):
        out.print(line, soft_wrap=True)
    out.print(summary_table(result.report))
    out.print(fidelity_table(result.report))
    written = f"wrote {result.output}"
    if not args.output and result.output != default_output(Path(args.model)):
        written += f" ({default_output(Path(args.model)).name} exists and was left as it is)"
    if args.report:
        written += f", report {_report_files(args.report)}"
    out.print(written, soft_wrap=True)
    if not result.passed:
        validation = result.report["validation"]
        why = (
            f"relative L2 error {validation['worst_rel_l2']:.4g} exceeds --max-rel-l2 "
            f"{args.max_rel_l2:g}"
            if validation["validated"]
            else f"--max-rel-l2 {args.max_rel_l2:g} cannot pass: {validation['status']} "
            f"({validation['detail']})"
        )
        sys.stderr.write(f"error: {why}; the model and report were written anyway\n")
    return result.exit_code


def _report_files(raw: str) -> str:
    from onnxcompress.report.files import report_target

    target = report_target(raw)
    return f"{target.path}/report.{{json,md,html}}" if target.is_folder else str(target.path)


def run_analyse(args: argparse.Namespace, console: Console) -> int:
    from onnxcompress import io
    from onnxcompress.analyse import analyse, format_table
    from onnxcompress.pipeline import check_input_model
    from onnxcompress.report.files import write_json

    model = io.load_model(args.model)
    # The check compress runs on load: a table of a model it would refuse proves nothing.
    check_input_model(model, Path(args.model))
    analysis = analyse(model, parse_input_shapes(args.input_shape))
    Console().print(format_table(analysis, top=args.top))
    if args.json:
        write_json(analysis.to_dict(), args.json)
    return EXIT_OK


def run_decode(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from onnxcompress import io
    from onnxcompress.coding import onnxc as onnxc

    source = Path(args.model)
    if not source.is_file():
        raise CompressError(f"{source}: no such file")
    # A default name never replaces a file: x.onnxc is often named after the user's x.onnx.
    preferred = source.with_suffix(".onnx")
    output = io.output_file(args.output) if args.output else io.free_path(preferred)
    if output.exists() and output.resolve() == source.resolve():
        raise CompressError(f"output {output} is the input file; choose another path with -o")
    model = onnxc.load_onnxc(source)
    written = io.save_model(model, output, replace=args.output is not None)
    kept = ""
    if args.output is None and output != preferred:
        kept = f"; {preferred} exists and was left as it is"
    Console().print(f"wrote {output} ({written} bytes){kept}", soft_wrap=True)
    return EXIT_OK


class Terminated(BaseException):
    """SIGTERM (what `timeout` and CI send), raised where the run is so that every `finally`
    on the way out removes its temp files; a BaseException, so no `except Exception` eats it."""


def _raise_terminated(_signum, _frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():  # signals: main thread only
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if argv and argv[0] == "analyse":
            return run_analyse(analyse_parser().parse_args(argv[1:]), console)
        if argv and argv[0] == "decode":
            return run_decode(decode_parser().parse_args(argv[1:]), console)
        return run_compress(compress_parser().parse_args(argv), console)
    except CompressError as exc:
        _fail(console, str(exc), verbose)
        return exc.exit_code
    except KeyboardInterrupt:
        _fail(console, "interrupted", verbose)
        return 130
    except Terminated:
        _fail(console, "terminated", verbose)
        return 128 + signal.SIGTERM
    except Exception as exc:  # a bug of ours: still one line unless -v
        _fail(
            console,
            f"internal error: {type(exc).__name__}: {exc}"
            " (run with -v for the traceback, and please report it)",
            verbose,
        )
        return EXIT_BAD_INPUT


def _fail(console: Console, message: str, verbose: bool) -> None:
    if verbose:
        console.print_exception()
    first = message.strip().splitlines()[0] if message.strip() else "error"
    # rich would wrap long lines; errors must stay one line for scripts.
    sys.stderr.write(f"error: {first}\n")


if __name__ == "__main__":
    sys.exit(main())
