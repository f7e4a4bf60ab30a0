"""What a pass receives and returns: context, result, per-node records, typed options."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import onnx

from onnxcompress.errors import CompressError

if TYPE_CHECKING:
    from onnxcompress.samples import SampleSource


class ProgressTask(Protocol):
    """One long step being shown: a context manager whose `advance(n)` counts work done."""

    def __enter__(self) -> ProgressTask: ...

    def __exit__(self, *exc: object) -> None: ...

    def advance(self, n: int = 1) -> None: ...


T = TypeVar("T")

# progress(description, total) -> ProgressTask; total None when the amount is unknown.
Progress = Callable[[str, "int | None"], ProgressTask]


# outline({loop description: share of the pass's time}): a long pass says once which of its
# loops make up its time, so that the CLI can show one estimate of the time left.
Outline = Callable[[dict[str, float]], None]


def no_outline(shares: dict[str, float]) -> None:
    """The default outline hook: nobody estimates anything."""
    return None


class _SilentTask:
    def __enter__(self) -> _SilentTask:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, n: int = 1) -> None:
        return None


def no_progress(description: str, total: int | None = None) -> ProgressTask:
    """The default progress hook: shows nothing, so passes and tests need no display.

    Passes report long loops without printing::

        with context.progress("timing layers", len(layers)) as task:
            for layer in layers:
                ...
                task.advance()
    """
    return _SilentTask()


def track(progress: Progress, description: str, items: Sequence[T]) -> Iterator[T]:
    """Iterate `items`, counting each one done on a progress task:
    `for layer in track(context.progress, "timing layers", layers): ...`."""
    with progress(description, len(items)) as task:
        for item in items:
            yield item
            task.advance()


def sample_count(batches: list[dict[str, np.ndarray]] | None) -> int:
    """Samples in calibration batches: the leading axis of each batch's first input."""
    return sum(_rows(batch) for batch in batches or [])


def _rows(batch: dict[str, np.ndarray]) -> int:
    # A scalar input (Silero VAD's sample rate) has no batch axis: the first that has one.
    return next((len(value) for value in batch.values() if np.ndim(value) > 0), 1)


def first_samples(
    batches: list[dict[str, np.ndarray]] | None, count: int
) -> list[dict[str, np.ndarray]] | None:
    """The first `count` samples of the calibration batches (None without data)."""
    if not batches:
        return None
    out, left = [], count
    for batch in batches:
        rows = _rows(batch)
        take = min(rows, left)
        # A whole batch goes as it is: inputs whose batch axis is not the first stay whole.
        out.append(batch if take == rows else _leading(batch, take))
        left -= take
        if left <= 0:
            break
    return out


@dataclass
class PassContext:
    """What the core knows that a pass may use; passes do no I/O of their own."""

    input_shapes: dict[str, list[int]]
    # Calibration batches (input name -> array), or None when the run has no user data.
    calibration: list[dict[str, np.ndarray]] | None = None
    seed: int = 0
    threads: int = 2
    # Where long loops report how far they are (the CLI shows a bar); silent by default.
    progress: Progress = no_progress
    # Labels of the calibration samples in batch order (None without labels).
    labels: np.ndarray | None = None
    # Worker processes a pass may use for independent jobs (--jobs).
    jobs: int = 1
    # Where those jobs run: "local" (this machine) or "ray" (--executor), and the Ray cluster
    # (--ray-address; None: $RAY_ADDRESS, else a local cluster).
    executor: str = "local"
    ray_address: str | None = None
    # Where a long pass outlines its loops (the CLI estimates the time left); silent by default.
    outline: Outline = no_outline
    # The model the run started from, before any pass (run_passes sets it): what `distill`
    # trains the compressed model to imitate.
    original: onnx.ModelProto | None = None
    # Samples to train on (--train-data), read an epoch at a time; None without them. Only
    # training passes read them; the others fit on `calibration`.
    training: SampleSource | None = None


@dataclass
class NodeRecord:
    """What a pass did to one node: rewritten (with before/after sizes) or skipped (why)."""

    node: str
    op: str
    status: str  # "rewritten" | "skipped" | "reverted"
    reason: str = ""
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "", {})}


@dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    records: list[NodeRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    # Outputs for the writer rather than the report, e.g. "coded_weights": a list of
    # onnxc.CodedWeights that a `.onnxc` output uses if the weights are still the same.
    artifacts: dict[str, Any] = field(default_factory=dict)


PassFunction = Callable[[onnx.ModelProto, Any, PassContext], PassResult]


@dataclass(frozen=True)
class PassSpec:
    """A registered pass: its entry function, its frozen options dataclass and one line of help.
    `idempotent`: a second run on its own output changes nothing (its contract; the tests run
    every such pass twice). Other passes either compress further (their budget is of the model
    they are given) or refuse in one line when nothing is left to do. `lossy`: it changes
    what the model computes (not an exact rewrite), so without the user's data the run warns
    that the result was judged on made-up inputs only."""

    name: str
    run: PassFunction
    options: type
    help: str
    idempotent: bool = False
    lossy: bool = False

    def option_fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.options))

    def make_options(self, raw: dict[str, Any]) -> Any:
        """Build the options dataclass from strings (CLI) or typed values (TOML, API)."""
        fields = {f.name: f for f in self.option_fields()}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            valid = ", ".join(sorted(fields)) or "none"
            raise CompressError(
                f"unknown option {self.name}.{unknown[0]}; options of {self.name}: {valid}"
            )
        hints = typing.get_type_hints(self.options)
        values = {name: coerce_option(self.name, name, hints[name], raw[name]) for name in raw}
        try:
            return self.options(**values)
        except (ValueError, TypeError) as exc:
            raise CompressError(f"{self.name}: {exc}") from exc


def _leading(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    return {name: value[:rows] if np.ndim(value) > 0 else value for name, value in batch.items()}


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text `--list-passes` shows."""
    return field(default=default, metadata={"help": help, **kwargs})


def comma_list(text: str | None) -> list[str]:
    """The non-empty, stripped items of a comma-separated option ("a, b,,c" → [a, b, c])."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


# numpy's legacy generators (tensorly seeds with them) take seeds in [0, 2**32).
MAX_SEED = 2**32 - 1


def require_at_least_one(options: Any, names: tuple[str, ...]) -> None:
    """ValueError for the first of `names` that is set (not None) and below 1: counts such as
    ranks, groups and alignments."""
    for name in names:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def require_fraction(options: Any, names: tuple[str, ...]) -> None:
    """ValueError for the first of `names` that is set and outside (0, 1]: targets and energies,
    refused when the options are read rather than after the layers were measured."""
    for name in names:
        value = getattr(options, name)
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{name} must be a fraction in (0, 1], got {value}")


def option_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def coerce_option(pass_name: str, name: str, hint: Any, value: Any) -> Any:
    """Turn an option value into the declared type, or raise one clear CompressError."""
    label = f"{pass_name}.{name}"
    kinds = _allowed_types(hint)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if type(None) in kinds:
            return None
        raise CompressError(f"option {label} cannot be empty")
    for kind in kinds:
        if kind is type(None):
            continue
        converted = _convert(value, kind)
        if isinstance(converted, float) and not math.isfinite(converted):
            # Every float option is a fraction, tolerance or factor: nan/inf would run silently.
            raise CompressError(f"option {label}={value!r}: expected a finite number")
        if converted is not _FAIL:
            return converted
    names = " or ".join(k.__name__ for k in kinds if k is not type(None))
    raise CompressError(f"option {label}={value!r}: expected {names}")


_FAIL = object()


def _allowed_types(hint: Any) -> list[type]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return list(typing.get_args(hint))
    if origin is typing.Literal:
        return [str]
    return [hint]


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        return _FAIL
    if kind is int:
        if isinstance(value, bool):
            return _FAIL
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return _FAIL
        return _FAIL
    if kind is float:
        if isinstance(value, bool):
            return _FAIL
        try:
            return float(value)
        except (TypeError, ValueError):
            return _FAIL
    if kind is str:
        return str(value)
    return _FAIL
