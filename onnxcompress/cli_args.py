"""The command line's words: argparse parsers of the three commands, argument types that refuse
out-of-range values at parse time (argparse turns their ArgumentTypeError into one usage line
and exit 2), and the parsing of --input-shape, --input-range, --opt and --config."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from onnxcompress.errors import CompressError
from onnxcompress.executor import EXECUTORS
from onnxcompress.passkit import MAX_SEED, comma_list


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def at_least_one(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def up_to_cores(text: str) -> int:
    """1 to the usable cores, for --threads and --jobs: more only contend, and each job is a
    process with its own model copy (--threads 100000 took 16.5 GB and crashed)."""
    value, cores = _integer(text), usable_cores()
    if not 1 <= value <= cores:
        raise argparse.ArgumentTypeError(
            f"expected 1 to {cores} (the cores this process may use on this machine), got {value}"
        )
    return value


def seed(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {value}")
    return value


def non_negative_number(text: str) -> float:
    """A finite float >= 0 (a tolerance: nan would fail every run, -1 any run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


COMMANDS = """commands:
  python -m onnxcompress MODEL.onnx --passes P1,P2 [options]  compress (the options above)
  python -m onnxcompress analyse MODEL.onnx [--json F] [--top N]  MACs and parameters per layer
  python -m onnxcompress decode MODEL.onnxc [-o MODEL.onnx]  a .onnxc file back to .onnx
  (analyse --help and decode --help give their options)

where to start:
  python -m onnxcompress --list-passes  what each pass is for, in the order to try them
  python -m onnxcompress MODEL.onnx --passes int8 --data inputs.npz
  then read the verdict, the run's last line: deployable, lossy or broken"""


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
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument(
        "--list-passes",
        nargs="?",
        const="",
        metavar="PASS",
        help="what each pass is for and when to use it; with a PASS, its options and defaults",
    )
    p.add_argument("--data", help=".npz with one array per input name (+ optional 'labels')")
    p.add_argument("--images", help="folder of images used as calibration/validation inputs")
    p.add_argument(
        "--preprocess",
        help="how --images pixels become input (required with --images), e.g. for ImageNet "
        "'resize=256,crop=224,scale=1/255,mean=0.485,0.456,0.406,std=0.229,0.224,0.225'; "
        "keys resize, crop, mean, std, scale, layout, bgr, grayscale, dtype; list values split "
        "by commas, spaces, ; or /",
    )
    p.add_argument("--labels", help="labels for --images: '<file>, <int>' lines or one int a line")
    p.add_argument(
        "--train-data",
        action="append",
        default=[],
        metavar="PATH",
        help="samples for the passes that train, read lazily: an .npz file, a folder of "
        ".npz files (one array per input name, samples on the first axis, optional "
        "'labels'; read one file at a time) or a folder of images (--preprocess; decoded a "
        "batch at a time); repeatable. --data/--images still refit and validate",
    )
    p.add_argument("--train-labels", help="labels for --train-data images, as --labels")
    p.add_argument("--calib-count", type=at_least_one, help="use at most this many samples")
    p.add_argument(
        "--batch-size", type=at_least_one, help="batch size for data runs (dynamic batch)"
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.25,
        help="fraction of --data/--images samples kept out of refit and used only "
        "to validate (default 0.25). 0 gives the passes every sample: if they read them, the "
        "run is 'not validated' and --max-rel-l2 fails it",
    )
    p.add_argument("--seed", type=seed, default=0, help="seed for random inputs (default 0)")
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
        type=up_to_cores,
        default=2,
        help="onnxruntime threads, at most the cores this process may use (default 2)",
    )
    p.add_argument(
        "--jobs",
        type=up_to_cores,
        default=1,
        help="worker processes for independent jobs (auto)",
    )
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="where auto's jobs run: local (this machine, --jobs processes) or ray (a Ray "
        'cluster; pip install "onnxcompress[ray]")',
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --executor ray: the cluster (HOST:6379, ray://HOST:10001 or auto; default "
        "$RAY_ADDRESS, else a local cluster on this machine)",
    )
    p.add_argument("--no-bench", action="store_true", help="skip the latency benchmark")
    p.add_argument("--bench-repeats", type=at_least_one, default=30, help="timed runs per model")
    p.add_argument(
        "--max-rel-l2",
        type=non_negative_number,
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
    p.add_argument("--top", type=at_least_one, help="show only the N layers with the most MACs")
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
