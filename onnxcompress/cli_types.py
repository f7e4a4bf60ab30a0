"""argparse `type=` functions that refuse out-of-range values at parse time: argparse turns
their ArgumentTypeError into one usage line (`argument --threads: ...`) and exit 2."""

from __future__ import annotations

import argparse
import math
import os

from onnxcompress.passkit import MAX_SEED


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
