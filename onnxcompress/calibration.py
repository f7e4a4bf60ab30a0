"""Calibration inputs for validation and data-aware passes: seeded random data, `.npz` files and
folders of images with a preprocessing spec, all cut into batches the model can run."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxcompress.batch_layout import BatchLayout, batch_axes, batch_layout
from onnxcompress.errors import CompressError
from onnxcompress.graph import dim_values, runtime_inputs
from onnxcompress.images import Preprocess, image_input, load_images
from onnxcompress.input_checks import (
    made_up_bytes,
    non_finite_count,
    random_batch_count,
    refuse_huge_batch,
    require_input_arrays,
)
from onnxcompress.input_ranges import input_ranges, random_source

log = logging.getLogger(__name__)

DEFAULT_RANDOM_BATCHES = 4
LABELS_KEY = "labels"


@dataclass
class Calibration:
    """Batches ready to feed, labels per sample (or None), and where they came from."""

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    source: str  # in words, for the report: "random, ... seed 0", "file x.npz (512 samples)"
    # The axis each input stacks samples on (None: the same array in every batch); None when
    # unknown, and then samples are split for validation only in whole batches.
    axes: dict[str, int | None] | None = None
    fixed_batch: bool = True  # the model fixes its batch size: no batch can be cut


def calibration_inputs(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    *,
    data: str | Path | None = None,
    images: str | Path | None = None,
    preprocess: Preprocess | str | None = None,
    labels: str | Path | None = None,
    count: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    fixed: dict[str, np.ndarray] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> Calibration:
    """The calibration set: from `data` (.npz), from `images` (a folder), else seeded random.

    `count` caps the samples (random: default 4 batches of the pinned shape). `fixed` gives
    arrays that random data cannot stand in for (e.g. an int64 sample rate); `ranges` the
    interval random values of an input are drawn from (see `random_inputs`).
    """
    if ranges and (data is not None or images is not None):
        raise CompressError(
            "--input-range sets the random inputs used without data; drop it when giving "
            "--data or --images"
        )
    if data is not None and images is not None:
        raise CompressError("give calibration data either as --data FILE.npz or as --images DIR")
    if count is not None and count < 1:
        raise CompressError(f"calibration count must be at least 1, got {count}")
    if labels is not None and images is None:
        raise CompressError(
            "a labels file goes with --images; with --data put the labels in the file "
            f"as an int array named '{LABELS_KEY}'"
        )
    # How samples stack, so that validation can hold some out of a single batch.
    pins = batch_layout(model, input_shapes)
    layout = {"axes": pins.axes, "fixed_batch": _batch_is_fixed(model, pins.axes)}
    if data is not None:
        batches, file_labels, shown = read_npz_batches(data, model, input_shapes, batch_size, count)
        layout = {"axes": shown.axes, "fixed_batch": _batch_is_fixed(model, shown.axes)}
        samples = sum(_batch_rows(model, batch, shown.axes) for batch in batches)
        if samples == 0:
            raise CompressError(
                f"{Path(data).name} holds 0 samples; give at least one sample per input"
            )
        source = f"file {Path(data).name} ({_noted(f'{samples} samples', shown)})"
        return Calibration(batches, file_labels, source, **layout)
    made_up = made_up_bytes(input_dtypes(model), input_shapes, fixed)
    refuse_huge_batch(model, input_shapes, made_up)  # before random or image inputs are made
    if images is not None:
        found = _image_calibration(
            model, input_shapes, images, preprocess, labels, count, batch_size
        )
        axes = dict.fromkeys(layout["axes"], 0)  # images stack on axis 0
        return dataclasses.replace(found, axes=axes, fixed_batch=layout["fixed_batch"])
    rows = _pinned_batch(model, input_shapes, pins.axes)
    batch_count = random_batch_count(made_up, count, rows, DEFAULT_RANDOM_BATCHES)
    batches = random_inputs(
        model, input_shapes, count=batch_count, seed=seed, fixed=fixed, ranges=ranges
    )
    source = random_source(input_dtypes(model), fixed or {}, ranges or {}, seed)
    return Calibration(batches, None, _noted(source, pins), **layout)


def _noted(text: str, layout: BatchLayout) -> str:
    """`text`, then which axis was taken as the batch where the model does not name it."""
    note = layout.note()
    return f"{text}; {note}" if note else text


def random_inputs(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    count: int = DEFAULT_RANDOM_BATCHES,
    seed: int = 0,
    fixed: dict[str, np.ndarray] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """`count` batches of random data in each input's pinned shape and dtype: standard normal,
    or uniform in [lo, hi] for an input in `ranges` (the key "" stands for every float input).

    Integer and bool inputs (token ids, sizes, flags) have no meaningful random stand-in: they
    must come from `fixed`, which is used as is in every batch.
    """
    fixed = fixed or {}
    rng = np.random.default_rng(seed)
    dtypes = input_dtypes(model)
    for name, dtype in dtypes.items():
        if name not in fixed and not np.issubdtype(dtype, np.floating):
            raise CompressError(
                f"input '{name}' takes {dtype} values that random data cannot stand in for; "
                f"give calibration data with --data FILE.npz holding an array named '{name}'"
            )
    per_input = input_ranges(dtypes, fixed, ranges or {})
    batches = []
    for _ in range(count):
        batch = {}
        for name, dtype in dtypes.items():
            if name in fixed:
                batch[name] = np.asarray(fixed[name])
            elif name in per_input:
                low, high = per_input[name]
                batch[name] = rng.uniform(low, high, input_shapes[name]).astype(dtype)
            else:
                values = rng.standard_normal(input_shapes[name], dtype=np.float32)
                batch[name] = values.astype(dtype)
        batches.append(batch)
    return batches


def load_npz_inputs(
    path: str | Path,
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    batch_size: int | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Batches from a .npz holding one array per input name, plus an optional 'labels' array.

    Each array stacks the samples along the input's batch axis (the named batch dim, else the
    one dynamic axis where the array differs from the pinned shape, e.g. state [2, N, 128]
    pinned [2, 1, 128]; see `batch_layout`); all give the same sample count N. An array of
    exactly the input's pinned shape whose sample count differs from N, or any array for an
    input with no batch axis (e.g. silero's scalar int64 'sr'), is used for every batch.
    """
    batches, labels, _ = read_npz_batches(path, model, input_shapes, batch_size, limit)
    return batches, labels


def read_npz_batches(
    path: str | Path,
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    batch_size: int | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None, BatchLayout]:
    """`load_npz_inputs`, and the batch layout the data showed."""
    arrays = _read_npz(path)
    dtypes = input_dtypes(model)
    require_input_arrays(path, arrays, dtypes)
    ignored = sorted(set(arrays) - set(dtypes) - {LABELS_KEY})
    if ignored:
        log.warning("%s: ignoring arrays that match no input: %s", path, ", ".join(ignored))
    layout = batch_layout(model, input_shapes, arrays)
    axes = layout.axes
    samples: dict[str, int] = {}
    for name, dtype in dtypes.items():
        array, shape, axis = arrays[name], input_shapes[name], axes[name]
        if array.dtype != dtype:
            raise CompressError(f"{path}: input '{name}' takes {dtype}, the file has {array.dtype}")
        if not _matches_except(array.shape, shape, axis):
            want = list(shape) if axis is None else [*shape[:axis], "N", *shape[axis + 1 :]]
            raise CompressError(
                f"{path}: array '{name}' has shape {list(array.shape)}, expected {want}"
            )
        bad = non_finite_count(array)
        if bad:
            raise CompressError(
                f"{path}: array '{name}' holds {bad} NaN or infinite value(s); calibration "
                "data must be finite numbers"
            )
        if axis is not None:
            samples[name] = array.shape[axis]
    sample_count = _sample_count(samples, arrays, input_shapes, layout.named)
    for name, count in list(samples.items()):
        if count != sample_count and list(arrays[name].shape) == list(input_shapes[name]):
            del samples[name]  # one array of the pinned shape: the same for every batch
    if len(set(samples.values())) > 1:
        counts = ", ".join(f"{name} {count}" for name, count in samples.items())
        raise CompressError(f"{path}: arrays give different sample counts: {counts}")
    # An input named 'labels' wins: then the file holds no labels.
    labels = None if LABELS_KEY in dtypes else _npz_labels(path, arrays, sample_count)
    if limit is not None:
        sample_count = min(sample_count, limit)
    stacked = {name: (arrays[name], axes[name]) for name in samples}
    constant = {name: arrays[name] for name in dtypes if name not in samples}
    batch_size = batch_size_for(model, input_shapes, batch_size, axes)
    for name in stacked if sample_count > batch_size else ():
        layout.refuse_if_unsure(name, input_shapes[name])  # the cut would follow a guess
    fixed = _batch_is_fixed(model, axes)
    batches = _split_batches(stacked, constant, sample_count, batch_size, fixed)
    if labels is not None:
        labels = labels[: sum(_batch_rows(model, batch, axes) for batch in batches)]
    # An array given once for every batch has no sample axis: it is never cut (holdout).
    layout.axes = {name: axis if name in stacked else None for name, axis in axes.items()}
    return batches, labels, layout


def _sample_count(samples: dict[str, int], arrays, input_shapes, named: set[str]) -> int:
    """Samples in the file, told by the arrays that differ from their pinned shape, else by
    those on the model's named batch axis: an array of exactly its pinned shape may be one
    given for every batch (a table [?, 16] pinned [8, 16] next to x with 4 samples)."""
    differ = {n for n in samples if list(arrays[n].shape) != list(input_shapes[n])}
    for group in (differ, named):
        counts = [count for name, count in samples.items() if name in group]
        if counts:
            return max(counts)
    return max(samples.values(), default=1)


def input_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """The numpy dtype of every runtime input, in graph order."""
    dtypes = {}
    for inp in runtime_inputs(model):
        elem_type = inp.type.tensor_type.elem_type
        try:
            dtypes[inp.name] = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        except Exception as exc:
            raise CompressError(f"input '{inp.name}' has a type numpy cannot hold") from exc
    return dtypes


def batch_size_for(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    requested: int | None,
    axes: dict[str, int | None] | None = None,
) -> int:
    """The batch size to cut data into: the user's, else the pinned batch dim."""
    axes = batch_axes(model, input_shapes) if axes is None else axes
    pinned = _pinned_batch(model, input_shapes, axes)
    if requested is None:
        return pinned
    if requested < 1:
        raise CompressError(f"batch size must be at least 1, got {requested}")
    if _batch_is_fixed(model, axes) and requested != pinned:
        raise CompressError(f"the model fixes its batch dim to {pinned}; cannot run {requested}")
    return requested


def _pinned_batch(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    axes: dict[str, int | None] | None = None,
) -> int:
    axes = batch_axes(model, input_shapes) if axes is None else axes
    for name, axis in axes.items():
        if axis is not None:
            return int(input_shapes[name][axis])
    return 1


def _batch_is_fixed(model: onnx.ModelProto, axes: dict[str, int | None] | None = None) -> bool:
    axes = batch_axes(model) if axes is None else axes
    for inp in runtime_inputs(model):
        axis = axes[inp.name]
        if axis is not None:
            return isinstance(dim_values(inp)[axis], int)
    return True


def _batch_rows(
    model: onnx.ModelProto,
    batch: dict[str, np.ndarray],
    axes: dict[str, int | None] | None = None,
) -> int:
    axes = batch_axes(model) if axes is None else axes
    for name, axis in axes.items():
        if axis is not None and batch[name].ndim > axis:
            return batch[name].shape[axis]
    return 1


def _split_batches(
    stacked: dict[str, tuple[np.ndarray, int]],
    constant: dict[str, np.ndarray],
    sample_count: int,
    batch_size: int,
    batch_is_fixed: bool,
) -> list[dict[str, np.ndarray]]:
    """Cut stacked arrays into batches (views, no copies); constants go in every batch."""
    if not stacked:
        return [dict(constant)]
    if batch_is_fixed:
        usable = sample_count - sample_count % batch_size
        if usable == 0:
            raise CompressError(
                f"{sample_count} sample(s) cannot fill one batch of {batch_size}, "
                "the batch size the model fixes"
            )
        if usable < sample_count:
            log.warning(
                "dropping the last %d sample(s): the model fixes the batch to %d",
                sample_count - usable,
                batch_size,
            )
        sample_count = usable
    batches = []
    for start in range(0, sample_count, batch_size):
        stop = min(start + batch_size, sample_count)
        batch = {}
        for name, (array, axis) in stacked.items():
            index = (slice(None),) * axis + (slice(start, stop),)
            batch[name] = np.ascontiguousarray(array[index])
        batch.update(constant)
        batches.append(batch)
    return batches


def _matches_except(shape: tuple[int, ...], pinned: list[int], axis: int | None) -> bool:
    if len(shape) != len(pinned):
        return False
    pairs = enumerate(zip(shape, pinned, strict=True))
    return all(got == want for i, (got, want) in pairs if i != axis)


def _read_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (AttributeError, TypeError):  # np.load gave a bare array: a .npy file
        raise CompressError(f"{path}: one bare array; give a .npz, one array per input") from None
    except Exception as exc:
        raise CompressError(f"{path}: not a readable .npz file ({exc})") from exc


def _npz_labels(path, arrays, sample_count: int) -> np.ndarray | None:
    labels = arrays.get(LABELS_KEY)
    if labels is None:
        return None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CompressError(f"{path}: '{LABELS_KEY}' must be a 1-D int array")
    if len(labels) != sample_count:
        raise CompressError(f"{path}: {len(labels)} labels for {sample_count} samples")
    return labels.astype(np.int64)


# -- images --------------------------------------------------------------------------------


def _image_calibration(model, input_shapes, folder, preprocess, labels_path, count, batch_size):
    name, preprocess = image_input(input_dtypes(model), input_shapes, preprocess, "--images")
    images, labels, files = load_images(folder, preprocess, input_shapes[name], count, labels_path)
    batch_size = batch_size_for(model, input_shapes, batch_size)
    batches = _split_batches(
        {name: (images, 0)}, {}, len(images), batch_size, _batch_is_fixed(model)
    )
    if labels is not None:
        labels = labels[: sum(len(batch[name]) for batch in batches)]
    return Calibration(batches, labels, f"images {folder} ({len(files)} files)")
