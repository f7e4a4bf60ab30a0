"""Command line: parses flags, shows progress, prints the report, maps errors to exit codes.

python -m onnxcompress model.onnx --passes fold_bn -o out.onnx
python -m onnxcompress model.onnx --passes prune -o out.onnxc   (entropy-coded model file)
python -m onnxcompress decode out.onnxc [-o model.onnx]
python -m onnxcompress analyse model.onnx [--json table.json]
python -m onnxcompress --list-passes [PASS]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console

from onnxcompress.cli_args import (
    analyse_parser,
    compress_parser,
    decode_parser,
    parse_input_ranges,
    parse_input_shapes,
    parse_pass_options,
)
from onnxcompress.errors import CompressError
from onnxcompress.passkit import comma_list
from onnxcompress.report.progress import TerminalProgress

EXIT_OK, EXIT_VALIDATION, EXIT_BAD_INPUT = 0, 1, 2


def list_passes(name: str) -> None:
    """Every pass in a line, or one pass (`name`) with its options; plain print, so that
    nothing is wrapped or read as markup."""
    from onnxcompress.pass_help import pass_details, pass_list

    print("\n".join(pass_details(name) if name else pass_list()))


def run_compress(args: argparse.Namespace, console: Console) -> int:
    from onnxcompress.pipeline import CompressOptions, compress, default_output
    from onnxcompress.report.terminal import (
        fidelity_table,
        pass_lines,
        run_line,
        summary_table,
        verdict_line,
        warning_lines,
    )

    if args.list_passes is not None:
        list_passes(args.list_passes)
        return EXIT_OK
    if not args.model:
        raise CompressError("no model given: python -m onnxcompress MODEL.onnx --passes NAMES")
    if args.ray_address and args.executor != "ray":
        raise CompressError("--ray-address names a Ray cluster: add --executor ray")
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
        train_data=args.train_data,
        train_labels=args.train_labels,
        calibration_count=args.calib_count,
        batch_size=args.batch_size,
        holdout=args.holdout,
        input_ranges=parse_input_ranges(args.input_range),
        seed=args.seed,
        threads=args.threads,
        jobs=args.jobs,
        executor=args.executor,
        ray_address=args.ray_address,
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
    out.print(run_line(result.report), soft_wrap=True, markup=False)
    for line in warning_lines(result.report):
        sys.stderr.write(line + "\n")  # shown without -v: the figures rest on made-up inputs
    out.print(verdict_line(result.report), soft_wrap=True, markup=False)
    if not result.passed:
        why = _failure(result.report, args.max_rel_l2)
        sys.stderr.write(f"error: {why}; the model and report were written anyway\n")
    return result.exit_code


def _failure(report: dict, max_rel_l2: float | None) -> str:
    """Why the run exits 1: over the user's tolerance, not validated under it, or broken."""
    validation = report["validation"]
    if max_rel_l2 is None:
        return (
            f"the result is {report['verdict']['text']} (--max-rel-l2 X judges by your own "
            "tolerance instead)"
        )
    if validation["validated"]:
        return (
            f"relative L2 error {validation['worst_rel_l2']:.4g} exceeds --max-rel-l2 "
            f"{max_rel_l2:g}"
        )
    return (
        f"--max-rel-l2 {max_rel_l2:g} cannot pass: {validation['status']} ({validation['detail']})"
    )


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
    from onnxcompress.coding import onnxc_reader as onnxc_reader

    source = Path(args.model)
    if not source.is_file():
        raise CompressError(f"{source}: no such file")
    # A default name never replaces a file: x.onnxc is often named after the user's x.onnx.
    preferred = source.with_suffix(".onnx")
    output = io.output_file(args.output) if args.output else io.free_path(preferred)
    if output.exists() and output.resolve() == source.resolve():
        raise CompressError(f"output {output} is the input file; choose another path with -o")
    model = onnxc_reader.load_onnxc(source)
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
